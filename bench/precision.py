"""bf16-mixed against 32-true on this machine, side by side: one training step (forward, backward, AdamW) of the
quickstart's base LM (a 5.5M Llama, 8 x 96 tokens) and of a MiniLM-L6-sized encoder (the reward model's shape,
16 x 64 tokens), alternating precisions, median over the repetitions. What `precision: auto` decides
(`madpo.hardware.resolve_precision`) is printed beside the ratio it rests on.

    python bench/precision.py                      # prints a markdown table
    python bench/precision.py --out bench/results/precision.md     # appends this machine's section
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from madpo.hardware import cpu_has_bf16, resolve_precision  # noqa: E402


def base_lm() -> tuple[torch.nn.Module, dict]:
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    ids = torch.randint(0, cfg.vocab_size, (8, 96))
    return LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids}


def minilm_sized() -> tuple[torch.nn.Module, dict]:
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=12,
    )
    return BertModel(cfg), {"input_ids": torch.randint(0, cfg.vocab_size, (16, 64))}


def step_seconds(build, precision: str, reps: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model, batch = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    times = []
    for i in range(reps + 1):  # the first step warms up kernels and the allocator
        start = time.perf_counter()
        with autocast:
            out = model(**batch)
            loss = out.loss if getattr(out, "loss", None) is not None else out.last_hidden_state.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="timed steps per model and precision (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two precisions")
    p.add_argument("--out", default=None, help="also write the table here")
    opts = p.parse_args(argv)
    rows = []
    for name, build in (("base LM (5.5M Llama, 8x96)", base_lm), ("MiniLM-L6-sized encoder (16x64)", minilm_sized)):
        times: dict[str, list[float]] = {"32-true": [], "bf16-mixed": []}
        for _ in range(opts.rounds):
            for precision in times:
                times[precision] += step_seconds(build, precision, opts.reps)
        fp32, bf16 = (statistics.median(times[k]) for k in ("32-true", "bf16-mixed"))
        rows.append(f"| {name} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f} |")
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    lines = [
        f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; native bf16 (avx512_bf16 or AMX): "
        f"{cpu_has_bf16()}; `precision: auto` on cpu -> {resolve_precision('auto', 'cpu')}",
        "",
        "| one training step, median s | 32-true | bf16-mixed | speed-up of bf16-mixed |",
        "|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if opts.out:  # appended: one section per machine measured
        args = " ".join(sys.argv[1:] if argv is None else argv)
        with Path(opts.out).open("a") as f:
            f.write(f"\n`python bench/precision.py {args}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
