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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/ is not a package: find its `speed` package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed.common import (  # noqa: E402  (re-exported: bench/memory.py and the tests use them as throughput.X)
    BASELINE,
    CONTENDERS,
    OFFLINE_ENV,
    REPO,
    BenchConfig,
    Result,
    _load_config,
    _load_pairs,
    _peak_rss_mb,
    _result,
    make_pairs,
    prepare,
    training_order,
)
from speed.contenders import plain_completion_logps, run_madpo, run_plain, run_trl  # noqa: E402
from speed.profiling import micro, print_profile  # noqa: E402

__all__ = [
    "BASELINE",
    "CONTENDERS",
    "OFFLINE_ENV",
    "REPO",
    "BenchConfig",
    "Result",
    "_load_config",
    "_load_pairs",
    "_peak_rss_mb",
    "_result",
    "main",
    "make_pairs",
    "micro",
    "plain_completion_logps",
    "prepare",
    "print_profile",
    "run_madpo",
    "run_plain",
    "run_trl",
    "summarise",
    "training_order",
]


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
