"""Policy-training throughput: madpo vs TRL's `DPOTrainer` vs a plain PyTorch loop, on the same work.

Every contender trains the same causal LM (one seed, saved once, loaded by all), on the same tokenised preference pairs
in the same order, with the same batch size, `max_length`, precision (fp32), optimiser (AdamW: lr, betas, eps, weight
decay; constant LR, no clipping) and number of steps, in one process on the CPU. Each contender runs in its own
subprocess (clean peak RSS from `getrusage`), and the runs are interleaved A/B/C/D, A/B/C/D, ... so machine drift
hits all of them alike; the table reports medians.

Contenders:
- `trl_default`: `DPOTrainer` with a reference model evaluated every step;
- `trl_precompute`: `DPOTrainer(precompute_ref_log_probs=True)` (TRL's fastest; a fresh cache directory per run);
- `madpo`: `PolicyLightningModule(loss=DPOLoss())` + `PreferenceDataModule` + `lightning.Trainer`, as a user runs it
  (reference log-probs precomputed once by the DataModule, timed separately);
- `madpo_grouped`: the same with `PreferenceDataModule(group_by_length=True)` (less padding; its batches hold other
  pairs, so its loss is that of another data order and only roughly comparable);
- `plain`: a hand-written loop doing the same maths (one concatenated forward, LM head only at completion
  positions, reference log-probs precomputed, fused AdamW): the floor that shows what a framework costs.

Identical data order: madpo's training sampler is epoch-seeded (`DistributedSampler(seed=0)`, epoch 0); the pairs
are handed to TRL and to the plain loop already permuted in exactly that order and read sequentially
(`train_sampling_strategy="sequential"`). The madpo worker checks the pair indices it trains on against that order.
Identical tokens: the prompt text starts with the BOS token and completions start with a space, so TRL's
"tokenise prompt+completion" and madpo's "tokenise separately and concatenate" give the same ids (checked in
`prepare`). Pairs fit `max_length` without truncation, so both truncation rules are moot.

TRL settings that differ from `DPOConfig()`'s own defaults, all so the work is equal (each makes TRL faster or keeps
the maths equal): `bf16=False` (fp32 for everyone), `gradient_checkpointing=False` (madpo's default; TRL's default
recomputes activations), `max_grad_norm=0` (no clipping anywhere), constant LR, the shared AdamW hyper-parameters,
`train_sampling_strategy="sequential"` on the pre-permuted pairs. Everything else is TRL's default (logging every 10
steps, `adamw_torch_fused`, its collator and fused LM head).

Usage:
    python bench/throughput.py --threads 1           # bench/results/throughput.md's protocol (~50 min)
    python bench/throughput.py --quick               # a tiny smoke run (~40 s; contenders 2 at a time, timings void)
    python bench/throughput.py --baseline-src DIR    # also madpo imported from DIR (before/after a change)
    python bench/throughput.py --profile madpo       # torch.profiler + Lightning SimpleProfiler of madpo's steps
    python bench/throughput.py --micro               # in-process A/B of the levers (log-probs, AdamW, padding)
Results and their reading: bench/results/throughput.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ("trl_default", "trl_precompute", "madpo", "madpo_grouped", "plain")
BASELINE = "madpo_baseline"  # madpo from another source tree (--baseline-src): before/after a change, side by side
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class BenchConfig:
    """Everything that defines the work (shared by every contender)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    vocab_size: int = 8192
    tokenizer_reviews: int = 6000
    n_pairs: int = 512
    batch_size: int = 8
    max_length: int = 128
    max_prompt_length: int = 64
    warmup_steps: int = 5
    steps: int = 35
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    beta: float = 0.1
    seed: int = 0
    scoring_batch_size: int = 32

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def loss_window(self) -> int:
        """Steps averaged into the reported loss: TRL's default logging interval (10) when it divides the run."""
        return 10 if self.total_steps % 10 == 0 else self.total_steps

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=128,
            vocab_size=1024,
            tokenizer_reviews=400,
            n_pairs=32,
            batch_size=4,
            max_length=64,
            max_prompt_length=24,
            warmup_steps=1,
            steps=2,
            lr=1e-3,
        )


@dataclass
class Result:
    """What one contender's worker measured."""

    contender: str
    pairs_per_s: float
    step_s: float
    timed_s: float
    precompute_s: float
    setup_s: float
    total_s: float
    peak_rss_mb: float
    loss: float
    losses: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------------
# The shared work: model, tokenizer, pairs, order
# ----------------------------------------------------------------------------------------------------------------------


def make_pairs(cfg: BenchConfig, tokenizer: Any, texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
    """`cfg.n_pairs` IMDB-derived pairs: prompt = the first words of a review (after BOS), chosen = a continuation
    taken from a positive review, rejected = one from a negative review; each prompt+completion fits `max_length`
    (BOS and EOS included), and tokenising prompt+completion as one string gives the same ids as tokenising them
    separately (so TRL's and madpo's tokenisations agree)."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    pos = [t for t, lab in zip(texts, labels, strict=True) if lab == 1]
    neg = [t for t, lab in zip(texts, labels, strict=True) if lab == 0]
    bos, eos = tokenizer.bos_token, tokenizer.eos_token

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pairs: list[dict[str, Any]] = []
    i = 0
    while len(pairs) < cfg.n_pairs:
        source = (neg if i % 2 else pos)[i // 2]
        prompt = bos + " ".join(source.split()[: int(rng.integers(4, 13))])
        budget = cfg.max_length - len(ids(prompt)) - 1  # room for the completion and its EOS
        completions = []
        for pool, offset in ((pos, 5000), (neg, 5000)):
            words = pool[offset + i].split()[int(rng.integers(0, 10)) :]
            words = words[: int(rng.integers(8, 90))]
            while words and len(ids(" " + " ".join(words))) > budget:
                words = words[: len(words) * 9 // 10]  # drop the last tenth until it fits
            completions.append(" " + " ".join(words))
        i += 1
        chosen, rejected = completions
        if chosen.strip() == "" or rejected.strip() == "" or chosen == rejected:
            continue
        p = ids(prompt)
        if len(p) >= cfg.max_prompt_length:
            continue
        c, r = ids(chosen) + ids(eos), ids(rejected) + ids(eos)
        if ids(prompt + chosen + eos) != p + c or ids(prompt + rejected + eos) != p + r:
            continue  # a token merges across the boundary: skip rather than let the tokenisations differ
        if len(p) + max(len(c), len(r)) > cfg.max_length:
            continue
        pairs.append(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected, "n_tokens": len(p) * 2 + len(c) + len(r)}
        )
    return pairs


def training_order(cfg: BenchConfig, n: int) -> list[int]:
    """The pair order of madpo's first epoch: `DistributedSampler(shuffle=True, seed=cfg.seed)` at epoch 0."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(cfg.seed + 0)
    return torch.randperm(n, generator=generator).tolist()


def prepare(workdir: Path, cfg: BenchConfig) -> dict[str, Any]:
    """Train the tokenizer, build and save the model once, write the pairs. Returns a description of the work."""
    from madpo.modeling import build_causal_lm, train_bpe_tokenizer
    from madpo.pipeline.reviews import load_imdb_reviews

    reviews = load_imdb_reviews()
    texts, labels = list(reviews["text"]), list(reviews["label"])
    half = len(texts) // 2
    k = cfg.tokenizer_reviews // 2
    model_dir = workdir / "model"
    tokenizer = train_bpe_tokenizer(texts[:k] + texts[half : half + k], model_dir, vocab_size=cfg.vocab_size)
    model = build_causal_lm(
        tokenizer,
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(256, cfg.max_length),
        tie_word_embeddings=False,
    )
    model.save_pretrained(model_dir)
    pairs = make_pairs(cfg, tokenizer, texts, labels)
    order = training_order(cfg, len(pairs))
    with open(workdir / "pairs.jsonl", "w") as f:
        for row in pairs:
            f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    (workdir / "order.json").write_text(json.dumps(order))
    n_tokens = [row["n_tokens"] for row in pairs]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "pairs": len(pairs),
        "mean_tokens_per_pair": statistics.mean(n_tokens),
    }


def _load_config(workdir: Path) -> BenchConfig:
    raw = json.loads((workdir / "config.json").read_text())
    raw["betas"] = tuple(raw["betas"])
    return BenchConfig(**{f.name: raw[f.name] for f in fields(BenchConfig)})


def _load_pairs(workdir: Path, ordered: bool) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    if not ordered:
        return rows
    return [rows[i] for i in json.loads((workdir / "order.json").read_text())]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _result(
    contender: str,
    cfg: BenchConfig,
    marks: list[float],
    losses: list[float],
    precompute_s: float,
    t0: float,
    t_first: float,
) -> Result:
    if len(marks) < cfg.total_steps:
        raise RuntimeError(f"{contender}: {len(marks)} step marks, expected {cfg.total_steps}")
    # marks[i] = end of step i; the timed window runs from the end of the last warm-up step to the end of the last step
    timed = marks[cfg.total_steps - 1] - (marks[cfg.warmup_steps - 1] if cfg.warmup_steps else t_first)
    window = losses[-cfg.loss_window :] if losses else []
    return Result(
        contender=contender,
        pairs_per_s=cfg.steps * cfg.batch_size / timed,
        step_s=timed / cfg.steps,
        timed_s=timed,
        precompute_s=precompute_s,
        setup_s=t_first - t0,
        total_s=marks[-1] - t0,
        peak_rss_mb=_peak_rss_mb(),
        loss=statistics.mean(window) if window else float("nan"),
        losses=losses,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ----------------------------------------------------------------------------------------------------------------------


def run_trl(workdir: Path, cfg: BenchConfig, *, precompute: bool, gradient_checkpointing: bool = False) -> Result:
    """TRL's `DPOTrainer`, default configuration apart from the equal-work settings of the module docstring."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    times: dict[str, float] = {"precompute": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        times["precompute"] += time.perf_counter() - start
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute  # type: ignore[method-assign]
    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.setdefault("first", time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    model_dir = str(workdir / "model")
    train = datasets.Dataset.from_list(_load_pairs(workdir, ordered=True))
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-out-", dir=workdir),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.total_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_epsilon=cfg.eps,
        max_grad_norm=0.0,
        bf16=False,
        gradient_checkpointing=gradient_checkpointing,
        max_length=cfg.max_length,
        beta=cfg.beta,
        precompute_ref_log_probs=precompute,
        logging_steps=cfg.loss_window,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        use_cpu=True,
        seed=cfg.seed,
        model_init_kwargs={"dtype": "float32"},
    )
    try:
        trainer = DPOTrainer(
            model=model_dir, args=args, train_dataset=train, processing_class=AutoTokenizer.from_pretrained(model_dir)
        )
        trainer.add_callback(StepTimer())
        trainer.train()
    finally:
        DPOTrainer._precompute_ref_logps = original  # type: ignore[method-assign]
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    result = _result(
        "trl_precompute" if precompute else "trl_default", cfg, marks, [], times["precompute"], t0, times["first"]
    )
    result.loss = losses[-1] if losses else float("nan")  # TRL logs the mean over the last `loss_window` steps
    result.losses = losses
    return result


def run_madpo(workdir: Path, cfg: BenchConfig, *, profile: bool = False, group_by_length: bool = False) -> Result:
    """madpo as a user runs it: `PolicyLightningModule(loss=DPOLoss())` + `PreferenceDataModule` +
    `lightning.Trainer`."""
    import datasets
    import lightning as L

    from madpo import PolicyLightningModule, PreferenceDataModule
    from madpo.losses import DPOLoss
    from madpo.modules.base import OptimizerOptions

    t0 = time.perf_counter()
    model_dir = str(workdir / "model")
    expected = json.loads((workdir / "order.json").read_text())
    marks: list[float] = []
    losses: list[Any] = []
    seen: list[int] = []
    times: dict[str, float] = {}

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
            times.setdefault("first", time.perf_counter())
            seen.extend(batch["index"].tolist())

        def on_train_batch_end(
            self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
        ) -> None:
            marks.append(time.perf_counter())
            losses.append(outputs["loss"].detach())

    module = PolicyLightningModule(
        model_name_or_path=model_dir,
        loss=DPOLoss(beta=cfg.beta),
        optimizer=OptimizerOptions(
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
            eps=cfg.eps,
            warmup_ratio=0.0,
            schedule="constant",
        ),
        export=False,
    )
    extra = {"group_by_length": True} if group_by_length else {}
    data = PreferenceDataModule.from_datasets(
        datasets.Dataset.from_list(_load_pairs(workdir, ordered=False)),
        tokenizer=model_dir,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        batch_size=cfg.batch_size,
        scoring_batch_size=cfg.scoring_batch_size,
        cache_dir=tempfile.mkdtemp(prefix="madpo-cache-", dir=workdir),  # cold cache every run
        seed=cfg.seed,
        **extra,
    )
    original = data._add_reference_logps

    def timed_precompute(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        original(*args, **kwargs)
        times["precompute"] = time.perf_counter() - start

    data._add_reference_logps = timed_precompute  # type: ignore[method-assign]
    callbacks: list[L.Callback] = [StepTimer()]
    profiler: Any = None
    if profile:
        from lightning.pytorch.profilers import SimpleProfiler

        profiler = SimpleProfiler()
        callbacks.append(_torch_profile_callback(cfg))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=cfg.total_steps,
        default_root_dir=str(workdir / "madpo_runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        profiler=profiler,
    )
    trainer.fit(module, datamodule=data)
    if profiler is not None:
        print(profiler.summary())
    if not group_by_length and seen[: len(expected)] != expected[: len(seen)]:
        raise RuntimeError("madpo trained on pairs in another order than the one given to TRL and the plain loop")
    name = "madpo_grouped" if group_by_length else "madpo"
    return _result(name, cfg, marks, [float(x) for x in losses], times.get("precompute", 0.0), t0, times["first"])


class _PlainBatches:
    """Right-padded [chosen; rejected] batches of pre-tokenised pairs (what any collator produces)."""

    def __init__(self, rows: list[dict[str, list[int]]], pad_id: int) -> None:
        self.rows, self.pad_id = rows, pad_id

    def collate(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
        starts = [len(r["prompt_ids"]) for r in rows] * 2
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        completion = torch.zeros((len(seqs), width), dtype=torch.bool)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
            completion[i, start : len(s)] = True
        return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def plain_completion_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Σ log p(completion tokens) per row: decoder once, LM head only at positions that predict a completion token."""
    import torch
    import torch.nn.functional as F

    input_ids, completion = batch["input_ids"], batch["completion_mask"]
    hidden = model.model(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
    target = completion[:, 1:]
    logits = model.lm_head(hidden[:, :-1][target])
    token_logps = -F.cross_entropy(logits, input_ids[:, 1:][target], reduction="none")
    rows = torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(target)[target]
    return torch.zeros(input_ids.shape[0]).index_add(0, rows, token_logps)


def run_plain(workdir: Path, cfg: BenchConfig) -> Result:
    """The floor: a hand-written loop over the same pairs, same order, same maths, fused AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model_dir = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [tokenizer.eos_token_id]
    rows = [
        {"prompt_ids": ids(r["prompt"]), "chosen_ids": ids(r["chosen"]) + eos, "rejected_ids": ids(r["rejected"]) + eos}
        for r in _load_pairs(workdir, ordered=True)
    ]
    batches = _PlainBatches(rows, tokenizer.pad_token_id)
    # reference log-probs: one no-grad pass, longest pairs first
    start = time.perf_counter()
    model.eval()
    ref = torch.zeros(len(rows), 2)
    by_length = sorted(
        range(len(rows)),
        key=lambda i: -len(rows[i]["prompt_ids"]) - max(len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"])),
    )
    with torch.no_grad():
        for s in range(0, len(rows), cfg.scoring_batch_size):
            idx = by_length[s : s + cfg.scoring_batch_size]
            logps = plain_completion_logps(model, batches.collate([rows[i] for i in idx]))
            ref[idx] = torch.stack([logps[: len(idx)], logps[len(idx) :]], 1)
    precompute_s = time.perf_counter() - start
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=True,
    )
    marks: list[float] = []
    losses: list[Any] = []
    t_first = time.perf_counter()
    for step in range(cfg.total_steps):
        lo = (step * cfg.batch_size) % len(rows)
        batch = batches.collate(rows[lo : lo + cfg.batch_size])
        b = batch["input_ids"].shape[0] // 2
        logps = plain_completion_logps(model, batch)
        ref_c, ref_r = ref[lo : lo + b, 0], ref[lo : lo + b, 1]
        loss = -F.logsigmoid(cfg.beta * ((logps[:b] - ref_c) - (logps[b:] - ref_r))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        losses.append(loss.detach())
    return _result("plain", cfg, marks, [float(x) for x in losses], precompute_s, t0, t_first)


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


WORKERS = {
    "trl_default": lambda w, c: run_trl(w, c, precompute=False),
    "trl_precompute": lambda w, c: run_trl(w, c, precompute=True),
    "madpo": lambda w, c: run_madpo(w, c),
    "madpo_grouped": lambda w, c: run_madpo(w, c, group_by_length=True),
    BASELINE: lambda w, c: run_madpo(w, c),
    "plain": lambda w, c: run_plain(w, c),
}


# ----------------------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------------------


def _run_subprocess(
    workdir: Path,
    extra: list[str],
    tag: str,
    threads: int | None,
    *,
    echo: bool = False,
    src: str | None = None,
) -> dict[str, Any]:
    """Run this script with `extra` in a fresh process with its own datasets cache (TRL's precompute cache lives
    there, so every run starts cold), importing `madpo` from `src` (default: this repository); returns the JSON it
    prints on its `RESULT` line."""
    cache = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir))
    env = {**os.environ, **OFFLINE_ENV, "HF_DATASETS_CACHE": str(cache / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()) if src else str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--workdir", str(workdir)]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if echo:
        print(proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tag} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _run_worker(workdir: Path, contender: str, run: int, threads: int | None, baseline_src: str | None) -> Result:
    """One contender in a fresh subprocess."""
    src = baseline_src if contender == BASELINE else None
    result = _run_subprocess(workdir, ["--worker", contender], f"{contender}-{run}", threads, src=src)
    result["contender"] = contender
    return Result(**result)


def _median(results: list[Result], name: str) -> float:
    return statistics.median(getattr(r, name) for r in results)


def summarise(by_contender: dict[str, list[Result]], cfg: BenchConfig) -> str:
    """The markdown table (medians over runs) and the ratios (of the medians, and the median of the per-run ratios,
    which cancels drift between rounds)."""
    lines = [
        "| contender | pairs/s (median) | runs (pairs/s) | step ms | precompute s | epoch s (est.) | precompute + "
        "epoch s | precompute / epoch | peak RSS MB | loss (mean, last window) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    med: dict[str, float] = {}
    for name, results in by_contender.items():
        pps = _median(results, "pairs_per_s")
        med[name] = pps
        pre = _median(results, "precompute_s")
        epoch = cfg.n_pairs / pps
        runs = ", ".join(f"{r.pairs_per_s:.2f}" for r in results)
        ratio = f"{pre / epoch:.2f}" if pre else "-"
        lines.append(
            f"| {name} | **{pps:.2f}** | {runs} | {1e3 * _median(results, 'step_s'):.0f} | {pre:.1f} | {epoch:.1f} | "
            f"{pre + epoch:.1f} | {ratio} | {_median(results, 'peak_rss_mb'):.0f} | "
            f"{statistics.median(r.loss for r in results):.5f} |"
        )
    lines.append("")

    def ratio(a: str, b: str) -> str:
        per_run = [x.pairs_per_s / y.pairs_per_s for x, y in zip(by_contender[a], by_contender[b], strict=False)]
        return f"**{med[a] / med[b]:.2f}x** (per-run median {statistics.median(per_run):.2f}x)"

    trl = {k: v for k, v in med.items() if k.startswith("trl")}
    fastest = max(trl, key=trl.__getitem__) if trl else None
    for mine in ("madpo", "madpo_grouped"):
        if mine not in med:
            continue
        if fastest:
            lines.append(f"- {mine} / TRL fastest ({fastest}): {ratio(mine, fastest)}, target >= 1.6")
        if "trl_default" in med:
            lines.append(f"- {mine} / TRL default: {ratio(mine, 'trl_default')}, target >= 2")
        if "plain" in med:
            lines.append(f"- {mine} / plain loop: {ratio(mine, 'plain')}, target >= 0.9")
    if BASELINE in med and "madpo" in med:
        lines.append(f"- madpo / {BASELINE} (this tree vs --baseline-src): {ratio('madpo', BASELINE)}")
    if trl and "madpo" in med:
        rss = min(_median(by_contender[k], "peak_rss_mb") for k in trl)
        lines.append(
            f"- peak RSS: madpo {_median(by_contender['madpo'], 'peak_rss_mb'):.0f} MB, TRL's lowest {rss:.0f} MB "
            "(target: madpo <= TRL)"
        )
    if "madpo" in med:
        r = by_contender["madpo"]
        lines.append(
            f"- madpo precompute / one policy epoch: {_median(r, 'precompute_s') / (cfg.n_pairs / med['madpo']):.2f} "
            "(target <= 0.5)"
        )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "lightning", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": os.getloadavg()}


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="madpo-bench-") as tmp:
            yield Path(tmp)


def _trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and data, 1 run: a smoke test (< 1 min)")
    parser.add_argument("--runs", type=int, default=None, help="interleaved runs per contender (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (default 35)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed warm-up steps (default 5)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per batch (default 8)")
    parser.add_argument("--pairs", type=int, default=None, help="number of preference pairs (default 512)")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument(
        "--baseline-src",
        default=None,
        help="also run madpo from this source tree (e.g. `git worktree add /tmp/base HEAD`) as madpo_baseline",
    )
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    parser.add_argument("--workdir", default=None, help="keep the model, pairs and caches here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write all results (every run) to this JSON file")
    parser.add_argument(
        "--profile",
        choices=("madpo", "madpo_grouped", BASELINE),
        default=None,
        help="print torch.profiler and Lightning SimpleProfiler summaries of up to 10 steps of one contender, and exit",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: torch's; --quick: 1)"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="contenders run concurrently (default 1; --quick: 2; timings then void)"
    )
    parser.add_argument("--worker", choices=(*CONTENDERS, BASELINE), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--micro", action="store_true", help="in-process A/B of the individual levers (log-probs, AdamW, padding)"
    )
    parser.add_argument("--micro-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads and (args.prepare or args.worker or args.micro_worker):  # the driver itself stays torch-free
        import torch

        torch.set_num_threads(args.threads)
    if args.prepare:  # inside a subprocess: build the shared work
        workdir = Path(args.workdir)
        print("RESULT " + json.dumps(prepare(workdir, _load_config(workdir))), flush=True)
        return 0
    if args.micro_worker:
        workdir = Path(args.workdir)
        print("RESULT " + json.dumps(micro(workdir, _load_config(workdir))), flush=True)
        return 0
    if args.worker:  # inside a subprocess: run one contender on a prepared workdir
        workdir = Path(args.workdir)
        cfg = _load_config(workdir)
        if args.profile_worker:
            run_madpo(workdir, cfg, profile=True, group_by_length=args.worker == "madpo_grouped")
            print("RESULT {}")
            return 0
        result = WORKERS[args.worker](workdir, cfg)
        print("RESULT " + json.dumps(asdict(result)), flush=True)
        return 0

    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    overrides = {
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "batch_size": args.batch_size,
        "n_pairs": args.pairs,
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "max_length": args.max_length,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if cfg.total_steps * cfg.batch_size > cfg.n_pairs:
        parser.error("warm-up + timed steps must fit in one epoch of the pairs (identical order in every contender)")
    runs = args.runs or (1 if args.quick else 3)
    jobs = args.jobs or (2 if args.quick else 1)
    threads = args.threads or (1 if args.quick else None)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}")
    if args.baseline_src:
        if not (Path(args.baseline_src) / "madpo" / "__init__.py").is_file():
            parser.error(f"--baseline-src {args.baseline_src} holds no madpo package")
        contenders.insert(contenders.index("madpo") if "madpo" in contenders else 0, BASELINE)
    if not _trl_available():
        skipped = [c for c in contenders if c.startswith("trl")]
        if skipped:
            print(f"trl is not installed (pip install 'madpo[bench]'): skipping {skipped}")
        contenders = [c for c in contenders if not c.startswith("trl")]

    with _workdir(args.workdir) as workdir:
        (workdir / "config.json").write_text(json.dumps(asdict(cfg)))
        t = time.perf_counter()
        # everything heavy happens in subprocesses: a big driver would leak its peak RSS into the workers'
        # ru_maxrss (Linux carries the forked image's high-water mark across exec)
        info = _run_subprocess(workdir, ["--prepare"], "prepare", threads)
        print(f"prepared in {time.perf_counter() - t:.1f}s: {info}")
        if args.micro:
            _run_subprocess(workdir, ["--micro-worker"], "micro", threads, echo=True)
            return 0
        if args.profile:
            src = args.baseline_src if args.profile == BASELINE else None
            if args.profile == BASELINE and not src:
                parser.error(f"--profile {BASELINE} needs --baseline-src")
            _run_subprocess(
                workdir, ["--worker", args.profile, "--profile-worker"], "profile", threads, echo=True, src=src
            )
            return 0
        by_contender: dict[str, list[Result]] = {c: [] for c in contenders}
        if jobs > 1:
            print(f"--jobs {jobs}: contenders run concurrently, so their timings are NOT comparable (smoke test only)")
        for run in range(runs):
            # interleaved: A B C D, A B C D, ... (with --jobs, each round's contenders in parallel)
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [
                    pool.submit(_run_worker, workdir, contender, run, threads, args.baseline_src)
                    for contender in contenders
                ]
                for contender, future in zip(contenders, futures, strict=True):
                    result = future.result()
                    by_contender[contender].append(result)
                    print(
                        f"run {run} {contender:<15} {result.pairs_per_s:7.2f} pairs/s  "
                        f"precompute {result.precompute_s:6.2f}s  peak RSS {result.peak_rss_mb:6.0f} MB  "
                        f"loss {result.loss:.5f}  (load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
        table = summarise(by_contender, cfg)
        command = "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print()
        print(f"command: {command}")
        print(f"versions: {_versions()}")
        print(f"machine: {_machine()}")
        print(f"work: {info}, config: {asdict(cfg)}")
        print()
        print(table)
        if args.json:
            payload = {
                "command": command,
                "versions": _versions(),
                "machine": _machine(),
                "work": info,
                "config": asdict(cfg),
                "results": {k: [asdict(r) for r in v] for k, v in by_contender.items()},
                "table": table,
            }
            Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
