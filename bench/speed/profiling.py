"""Where the time goes: torch.profiler over madpo's steps (`--profile`) and the in-process A/B of the levers
(`--micro`)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from .common import BenchConfig, _load_pairs
from .contenders import _PlainBatches, plain_completion_logps


def _torch_profile_callback(cfg: BenchConfig) -> Any:
    """A Lightning callback running torch.profiler over up to 10 steps after warm-up, then printing the summary."""
    import lightning as L
    import torch

    class TorchProfile(L.Callback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.n = min(cfg.steps, 10)

        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
            if idx == cfg.warmup_steps:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_train_batch_end(
            self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
        ) -> None:
            if self.prof is not None and idx == cfg.warmup_steps + self.n - 1:
                self.prof.__exit__(None, None, None)
                print_profile(self.prof, self.n)
                self.prof = None

    return TorchProfile()


_CATEGORIES = (  # first match wins; op names as torch.profiler reports them (lower case)
    ("optimizer (AdamW)", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt")),
    (
        "log-softmax / CE",
        ("cross_entropy", "log_softmax", "nll_loss", "logsumexp", "amax", "aten::exp", "aten::log", "scatter_add"),
    ),
    ("attention (sdpa)", ("scaled_dot_product", "_efficient_attention", "flash_attention", "softmax")),
    ("matmul (linear + LM head)", ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("indexing / gather", ("index", "gather", "masked", "nonzero", "embedding")),
    ("elementwise / norms", ("mul", "add", "silu", "pow", "rsqrt", "mean", "neg", "cat", "sum", "div", "sub", "sigm")),
    ("copies / allocation", ("copy_", "empty", "zeros", "fill_", "clone", "aten::to", "contiguous", "resize")),
)


def print_profile(prof: Any, n_steps: int) -> None:
    """Top ops by self CPU time and a per-category share (self times, so nothing is counted twice)."""
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    total = sum(e.self_cpu_time_total for e in averages)
    buckets: dict[str, float] = {}
    for event in averages:
        name = event.key.lower()
        category = next((c for c, keys in _CATEGORIES if any(k in name for k in keys)), "other")
        buckets[category] = buckets.get(category, 0.0) + event.self_cpu_time_total
    print(f"per step: {total / n_steps / 1e3:.1f} ms of self CPU time over {n_steps} steps")
    for category, us in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {category:<24} {us / n_steps / 1e3:8.1f} ms/step  {100 * us / total:5.1f}%")


def micro(workdir: Path, cfg: BenchConfig, reps: int = 7) -> dict[str, Any]:
    """In-process A/B of the individual levers on the bench model, alternating A and B every repetition (drift hits
    both alike; medians reported), plus the padding of the training batches with and without `group_by_length`:

    - completion log-probs, forward + backward of a training batch: the straightforward fast path (decoder, LM head at
      completion positions, `F.cross_entropy`, i.e. madpo before this work and the plain loop) vs
      `madpo.modeling.sequence_logps` (selective log-softmax);
    - the same without autograd (reference scoring, a 32-pair batch): `cross_entropy` vs the chunked path;
    - one AdamW step over all parameters: the loop implementation vs fused.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from madpo.data.datamodule import length_grouped_order
    from madpo.modeling import sequence_logps

    model_dir = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [tokenizer.eos_token_id]
    rows = [
        {"prompt_ids": ids(r["prompt"]), "chosen_ids": ids(r["chosen"]) + eos, "rejected_ids": ids(r["rejected"]) + eos}
        for r in _load_pairs(workdir, ordered=True)
    ]
    batches = _PlainBatches(rows, tokenizer.pad_token_id)
    train_batch = batches.collate(rows[: cfg.batch_size])
    score_batch = batches.collate(rows[: cfg.scoring_batch_size])
    params = list(model.parameters())

    def new_logps(batch: dict[str, Any]) -> Any:
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0]

    def fwd_bwd(fn: Any) -> Any:
        def run() -> None:
            fn(train_batch).sum().backward()
            model.zero_grad(set_to_none=True)

        return run

    def no_grad(fn: Any) -> Any:
        def run() -> None:
            with torch.no_grad():
                fn(score_batch)

        return run

    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {
        "loop": torch.optim.AdamW(params, lr=1e-6, foreach=False),
        "fused": torch.optim.AdamW(params, lr=1e-6, fused=True),
    }
    cases = {
        "logps fwd+bwd, train batch": {
            "cross_entropy": fwd_bwd(lambda b: plain_completion_logps(model, b)),
            "selective": fwd_bwd(new_logps),
        },
        "logps no-grad, scoring batch": {
            "cross_entropy": no_grad(lambda b: plain_completion_logps(model, b)),
            "chunked": no_grad(new_logps),
        },
        "AdamW step": {name: opt.step for name, opt in optimizers.items()},
    }
    out: dict[str, Any] = {}
    for case, variants in cases.items():
        times: dict[str, list[float]] = {name: [] for name in variants}
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(reps):
            for name, fn in variants.items():
                if case == "AdamW step":
                    for p in params:
                        p.grad = torch.randn_like(p) * 1e-3
                start = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - start))
        out[case] = {name: statistics.median(v) for name, v in times.items()}
        print(f"{case}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out[case].items()), flush=True)
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    real = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)

    def padded(order: list[int]) -> int:
        return sum(
            2 * len(chunk) * max(lengths[i] for i in chunk)
            for chunk in (order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size))
        )

    random_order = list(range(len(rows)))  # rows are already in the epoch-0 shuffled order
    grouped = length_grouped_order(lengths, cfg.batch_size, cfg.seed)
    out["real / padded positions"] = {
        "shuffled": real / padded(random_order),
        "group_by_length": real / padded(grouped),
    }
    print(
        "real / padded token positions per epoch: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in out["real / padded positions"].items()),
        flush=True,
    )
    return out
