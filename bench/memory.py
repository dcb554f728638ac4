"""Peak memory and step time at a huge vocabulary: madpo vs TRL's `DPOTrainer` vs a plain PyTorch loop.

Protocol (the machinery is bench/throughput.py's, reused as it is: its `prepare`, pairs, data order, equal-work TRL
settings and its three contender runners `run_trl`, `run_madpo`, `run_plain`):

- the model: bench/throughput.py's tiny Llama (4 layers, d=256, 4 heads, MLP 1024, untied embeddings, one seed),
  its vocabulary then resized to 262,144 (gemma-3's; `resize_token_embeddings`, new rows drawn from the seed), so
  the embedding and the LM head hold 2 x 67M of its ~138M parameters. The BPE tokenizer keeps its 8,192 tokens (the
  extra rows are never a target, but every logit row spans all 262,144 entries, as with a real huge vocabulary);
- the work: the same IMDB-derived pairs in the same order, 8 pairs per batch, `max_length` 196 (prompt budget 64,
  as bench/throughput.py), fp32 on the CPU, AdamW (constant LR), `--warmup-steps` untimed then `--steps` timed;
- two settings: (a) `full`: full fine-tuning; (b) `lora`: peft LoRA r=16, alpha=32, dropout 0 on q/k/v/o_proj,
  embeddings and LM head frozen (the paper's setup);
- contenders: `trl_precompute` = TRL `DPOTrainer(precompute_ref_log_probs=True)` (peft_config in (b)); `madpo` =
  `PolicyLightningModule` + `PreferenceDataModule` (reference log-probs precomputed, the library's default; `lora=`
  in (b)); `plain` = the hand-written loop (LoRA injected in place in (b)); and, in (b) only, `madpo_nochunk` = madpo
  with `madpo.modeling.GRAD_CHUNK_ELEMENTS = 0` (the chunked frozen-head path off), so the chunking's own effect shows;
- each run is its own subprocess. Measured there: peak RSS (`resource.getrusage` ru_maxrss, whole process life,
  reference precompute included), `built` = RSS right after the AdamW optimiser is constructed (weights + optimiser
  built: the "weights + optimizer floor"; torch allocates the Adam moments lazily at the first step, so they, like the
  gradients, fall in "above floor", equally for every contender), and `resident` = the lowest RSS sampled (every
  10 ms) between the first and the last optimiser step (weights + Adam moments, gradients freed). Theoretical
  floor: 16 bytes per trained parameter (weight, gradient, 2 Adam moments) + 4 per frozen one;
- rounds interleaved (full: TRL, madpo, plain; lora: TRL, madpo, madpo_nochunk, plain; repeat); medians over rounds;
  ratios are of the medians, written "N x TRL".

Usage:
    python bench/memory.py --rounds 3                      # the protocol (writes bench/results/memory.{md,json})
    python bench/memory.py --tiny --contenders madpo,plain --out-dir /tmp/m   # smoke test (small vocab, 1 step)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (bench/ is not a package; its machinery is reused as it is)

REPO = tp.REPO
SETTINGS = ("full", "lora")
CONTENDERS = ("trl_precompute", "madpo", "madpo_nochunk", "plain")
LORA_ONLY = {"madpo_nochunk"}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
MB = 1024.0 * 1024.0


def protocol_config(tiny: bool) -> tuple[tp.BenchConfig, int]:
    """(the work, the model's vocabulary)."""
    if tiny:
        cfg = tp.BenchConfig.quick()
        cfg.n_pairs, cfg.warmup_steps, cfg.steps = 8, 1, 1
        return cfg, 4096
    cfg = tp.BenchConfig(max_length=196, max_prompt_length=64, batch_size=8, warmup_steps=1, steps=3, n_pairs=32)
    return cfg, 262_144


# ----------------------------------------------------------------------------------------------------------------------
# Inside the subprocesses
# ----------------------------------------------------------------------------------------------------------------------


def prepare(workdir: Path, cfg: tp.BenchConfig, vocab: int) -> dict[str, Any]:
    """bench/throughput.py's `prepare`, then the model's vocabulary resized to `vocab`."""
    import torch
    from transformers import AutoModelForCausalLM

    info = tp.prepare(workdir, cfg)
    model_dir = workdir / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(cfg.seed)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(model_dir)
    info["tokenizer_vocab"] = info.pop("vocab")
    info["model_vocab"] = model.config.vocab_size
    info["params"] = sum(p.numel() for p in model.parameters())
    return info


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


class _Probe:
    """RSS when AdamW is built (and what it trains), and the lowest RSS sampled between its first and last step."""

    def __init__(self) -> None:
        import torch

        self.built_mb = float("nan")
        self.trained = 0
        self.first_step_end: float | None = None
        self.last_step_end = 0.0
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        probe, init, step = self, torch.optim.AdamW.__init__, torch.optim.AdamW.step

        def patched_init(opt: Any, *args: Any, **kwargs: Any) -> None:
            init(opt, *args, **kwargs)
            probe.built_mb = _rss_mb()
            probe.trained = sum(p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad)

        def patched_step(opt: Any, *args: Any, **kwargs: Any) -> Any:
            out = step(opt, *args, **kwargs)
            probe.last_step_end = time.perf_counter()
            if probe.first_step_end is None:
                probe.first_step_end = probe.last_step_end
            return out

        torch.optim.AdamW.__init__ = patched_init  # type: ignore[method-assign]
        torch.optim.AdamW.step = patched_step  # type: ignore[method-assign]
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.samples.append((time.perf_counter(), _rss_mb()))

    def resident_mb(self) -> float:
        self._stop.set()
        # between the first and the last optimiser step: after the run returns, its model and optimiser are freed
        start = self.first_step_end if self.first_step_end is not None else float("inf")
        after = [rss for t, rss in self.samples if start < t < self.last_step_end]
        return min(after) if after else float("nan")


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(LORA["target_modules"]),
        task_type="CAUSAL_LM",
        bias="none",
    )


def _patch_madpo(lora: bool, chunk: bool) -> None:
    """`madpo.PolicyLightningModule`, as `run_madpo` builds it, with LoRA in setting (b); either loss API works
    (`loss="dpo", beta=...` or `loss=DPOLoss(beta=...)`)."""
    import madpo
    import madpo.modeling
    from madpo.modules.base import LoraOptions

    if not chunk:
        madpo.modeling.GRAD_CHUNK_ELEMENTS = 0
    cls = madpo.PolicyLightningModule

    def build(model_name_or_path: str, loss: Any = None, **kwargs: Any) -> Any:
        if isinstance(loss, str):
            from madpo.losses import DPOLoss

            assert loss == "dpo", loss
            loss = DPOLoss(beta=kwargs.pop("beta"))
        if lora:
            kwargs["lora"] = LoraOptions(**LORA)
        return cls(model_name_or_path, loss=loss, **kwargs)

    madpo.PolicyLightningModule = build  # run_madpo imports it by name at call time


def _patch_trl(lora: bool) -> None:
    import trl

    if not lora:
        return

    class LoraDPOTrainer(trl.DPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("peft_config", _lora_config())
            super().__init__(*args, **kwargs)

    trl.DPOTrainer = LoraDPOTrainer  # run_trl imports it by name at call time


def _patch_plain(lora: bool) -> None:
    """LoRA injected in place (no wrapper), so `plain_completion_logps` still finds `model.model` and `lm_head`."""
    if not lora:
        return
    from peft import inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        model = original(*args, **kwargs)
        model.requires_grad_(False)
        model = inject_adapter_in_model(_lora_config(), model)
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)
        return model

    AutoModelForCausalLM.from_pretrained = from_pretrained  # type: ignore[method-assign]


def worker(workdir: Path, contender: str, setting: str) -> dict[str, Any]:
    cfg = tp._load_config(workdir)
    probe = _Probe()
    lora = setting == "lora"
    if contender == "trl_precompute":
        _patch_trl(lora)
        result = tp.run_trl(workdir, cfg, precompute=True)
    elif contender in ("madpo", "madpo_nochunk"):
        _patch_madpo(lora, chunk=contender == "madpo")
        result = tp.run_madpo(workdir, cfg)
    elif contender == "plain":
        _patch_plain(lora)
        result = tp.run_plain(workdir, cfg)
    else:
        raise ValueError(contender)
    out = asdict(result)
    out.update(
        contender=contender,
        setting=setting,
        peak_rss_mb=tp._peak_rss_mb(),
        built_rss_mb=probe.built_mb,
        resident_rss_mb=probe.resident_mb(),
        trained_params=probe.trained,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The driver (torch-free, so its own RSS does not leak into the workers')
# ----------------------------------------------------------------------------------------------------------------------


def _subprocess(workdir: Path, extra: list[str], tag: str, threads: int | None) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=workdir))
    env = {
        **os.environ,
        **tp.OFFLINE_ENV,
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--workdir", str(workdir)]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"rc={proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarise(by: dict[str, dict[str, list[dict[str, Any]]]], info: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Markdown tables (one per setting) of the medians, the ratios to TRL, and the goals."""
    lines: list[str] = []
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for setting, contenders in by.items():
        rows: dict[str, dict[str, float]] = {}
        for name, runs in contenders.items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                continue
            trained = ok[0]["trained_params"]
            frozen = info["params"] - (0 if setting == "lora" else trained)
            rows[name] = {
                "peak": _median(ok, "peak_rss_mb"),
                "built": _median(ok, "built_rss_mb"),
                "resident": _median(ok, "resident_rss_mb"),
                "above": statistics.median(r["peak_rss_mb"] - r["built_rss_mb"] for r in ok),
                "step_s": _median(ok, "step_s"),
                "pairs_per_s": _median(ok, "pairs_per_s"),
                "precompute_s": _median(ok, "precompute_s"),
                "loss": _median(ok, "loss"),
                "trained": trained,
                "theory": (16 * trained + 4 * frozen) / MB,
                "runs": len(ok),
            }
        medians[setting] = rows
        trl = rows.get("trl_precompute")

        def x(name: str, key: str, rows: dict = rows, trl: Any = trl) -> str:
            return f"{rows[name][key] / trl[key]:.2f}x TRL" if trl else "-"

        title = {"full": "(a) full fine-tuning", "lora": "(b) LoRA r=16 on q/k/v/o, embeddings and head frozen"}
        lines += [
            f"### {title[setting]}",
            "",
            "| contender | runs | peak RSS MB | built (weights + optimiser) MB | above built MB | resident between "
            "steps MB | theoretical floor MB | step s | pairs/s | precompute s | loss | peak | above built "
            "| step time |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['runs']} | {r['peak']:.0f} | {r['built']:.0f} | {r['above']:.0f} | {r['resident']:.0f} "
                f"| {r['theory']:.0f} | {r['step_s']:.2f} | {r['pairs_per_s']:.2f} | {r['precompute_s']:.1f} "
                f"| {r['loss']:.5f} | {x(name, 'peak')} | {x(name, 'above')} | {x(name, 'step_s')} |"
            )
        for name, runs in contenders.items():
            for r in runs:
                if "error" in r:
                    lines.append(f"| {name} | error | {r['error'].splitlines()[-1][:200]} |")
        lines.append("")
    goals: list[str] = []
    full, lora = medians.get("full", {}), medians.get("lora", {})
    if "madpo" in lora and "trl_precompute" in lora:
        v = lora["madpo"]["peak"] / lora["trl_precompute"]["peak"]
        goals.append(f"- (b) madpo peak <= 0.5x TRL: **{v:.2f}x TRL** -> {'met' if v <= 0.5 else 'NOT met'}")
    if "madpo" in full and "trl_precompute" in full:
        v = full["madpo"]["peak"] / full["trl_precompute"]["peak"]
        w = full["madpo"]["above"] / full["trl_precompute"]["above"]
        goals.append(f"- (a) madpo peak <= 1.0x TRL: **{v:.2f}x TRL** -> {'met' if v <= 1.0 else 'NOT met'}")
        goals.append(f"- (a) madpo above-floor <= 0.5x TRL: **{w:.2f}x TRL** -> {'met' if w <= 0.5 else 'NOT met'}")
    if "madpo" in lora and "madpo_nochunk" in lora:
        s = lora["madpo"]["step_s"] / lora["madpo_nochunk"]["step_s"]
        p = lora["madpo"]["peak"] / lora["madpo_nochunk"]["peak"]
        goals.append(
            f"- (b) chunked frozen head vs GRAD_CHUNK_ELEMENTS=0: step time {s:.2f}x, peak {p:.2f}x "
            f"(goal: step time no slower -> {'met' if s <= 1.05 else 'NOT met'}, within 5% noise)"
        )
    return "\n".join(lines + goals), medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over them)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no round that would end past this (rounds done: reported)",
    )
    parser.add_argument("--tiny", action="store_true", help="small vocabulary and model, 1 step: a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of full,lora")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results"), help="where memory.{md,json} go")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker or args.prepare_vocab:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        workdir = Path(args.workdir)
        if args.prepare_vocab:
            out = prepare(workdir, tp._load_config(workdir), args.prepare_vocab)
        else:
            out = worker(workdir, args.worker, args.setting)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    cfg, vocab = protocol_config(args.tiny)
    if args.steps:
        cfg.steps = args.steps
    cfg.n_pairs = max(cfg.n_pairs, cfg.total_steps * cfg.batch_size)
    settings = [s for s in args.settings.split(",") if s]
    contenders = [c for c in args.contenders.split(",") if c]
    if set(settings) - set(SETTINGS) or set(contenders) - set(CONTENDERS):
        parser.error(f"settings in {SETTINGS}, contenders in {CONTENDERS}")
    if not tp._trl_available() and "trl_precompute" in contenders:
        print("trl is not installed (pip install 'madpo[bench]'): skipping trl_precompute")
        contenders.remove("trl_precompute")
    command = "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    with tp._workdir(args.workdir) as workdir:
        (workdir / "config.json").write_text(json.dumps(asdict(cfg)))
        info = _subprocess(workdir, ["--prepare-vocab", str(vocab)], "prepare", args.threads)
        if "error" in info:
            raise RuntimeError(f"prepare failed: {info['error']}")
        print(f"prepared: {info}", flush=True)
        by: dict[str, dict[str, list[dict[str, Any]]]] = {
            s: {c: [] for c in contenders if s == "lora" or c not in LORA_ONLY} for s in settings
        }
        loads: list[float] = []
        rounds = 0
        for rnd in range(args.rounds):
            elapsed = time.perf_counter() - t_start
            if args.max_minutes and rnd and elapsed * (rnd + 1) / rnd > 60 * args.max_minutes:
                print(f"stopping after {rnd} rounds (--max-minutes {args.max_minutes})", flush=True)
                break
            rounds += 1
            for setting, runs in by.items():
                for name in runs:
                    t = time.perf_counter()
                    r = _subprocess(
                        workdir, ["--worker", name, "--setting", setting], f"{name}-{setting}", args.threads
                    )
                    r["load1"] = os.getloadavg()[0]
                    r["wall_s"] = time.perf_counter() - t
                    loads.append(r["load1"])
                    runs[name].append(r)
                    if "error" in r:
                        print(f"round {rnd} {setting:<4} {name:<14} ERROR {r['error'][-300:]}", flush=True)
                    else:
                        print(
                            f"round {rnd} {setting:<4} {name:<14} peak {r['peak_rss_mb']:7.0f} MB  built "
                            f"{r['built_rss_mb']:7.0f}  resident {r['resident_rss_mb']:7.0f}  step "
                            f"{r['step_s']:6.2f} s  loss {r['loss']:.5f}  ({r['wall_s']:.0f} s, load {r['load1']:.2f})",
                            flush=True,
                        )
    table, medians = summarise(by, info)
    machine = tp._machine()
    machine.update(loadavg_start=load_start, loadavg_end=os.getloadavg(), load1_per_run=loads)
    versions = tp._versions()
    versions["peft"] = _version("peft")
    wall = time.perf_counter() - t_start
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "versions": versions,
        "machine": machine,
        "work": info,
        "config": asdict(cfg),
        "lora": LORA,
        "rounds": rounds,
        "wall_s": wall,
        "medians": medians,
        "runs": by,
    }
    (out_dir / "memory.json").write_text(json.dumps(payload, indent=2))
    md = [
        "# Peak memory and step time at a 262,144-token vocabulary: madpo vs TRL vs a plain loop"
        if not args.tiny
        else "# bench/memory.py --tiny (smoke test: numbers meaningless)",
        "",
        f"Command: `{command}` ({wall / 60:.1f} min in all).",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores (shared with other work); load average at start "
        f"{', '.join(f'{v:.2f}' for v in load_start)}, at end {', '.join(f'{v:.2f}' for v in machine['loadavg_end'])}"
        f", 1-min load per run {min(loads):.2f}-{max(loads):.2f}. "
        + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        f"Work: {info['params'] / 1e6:.1f}M parameters (vocabulary {info['model_vocab']:,}; tokenizer "
        f"{info['tokenizer_vocab']:,} tokens), {cfg.batch_size} pairs per batch, max_length {cfg.max_length} (prompt "
        f"budget {cfg.max_prompt_length}), {info['mean_tokens_per_pair']:.0f} tokens per pair on average, fp32, CPU, "
        f"{cfg.warmup_steps} warm-up + {cfg.steps} timed steps per run, medians over {rounds} interleaved rounds"
        + (f" (of {args.rounds} asked; --max-minutes)." if rounds < args.rounds else "."),
        "",
        "Protocol (from the script's docstring):",
        "",
        "```",
        (__doc__ or "").split("Usage:")[0].strip(),
        "```",
        "",
        "Columns: peak RSS = ru_maxrss of the run's process; built = RSS right after AdamW is constructed (weights + "
        "optimiser built); above built = peak - built (gradients, Adam moments, activations, logits, transients); "
        "resident between steps = lowest RSS sampled between the first and the last optimiser step; theoretical "
        "floor = 16 B per trained + 4 B per frozen parameter. Ratios are of medians, to TRL's "
        "`DPOTrainer(precompute_ref_log_probs=True)`.",
        "",
        table,
        "",
    ]
    (out_dir / "memory.md").write_text("\n".join(md))
    print()
    print(table)
    print(f"\nwrote {out_dir / 'memory.md'} and {out_dir / 'memory.json'} ({wall / 60:.1f} min)")
    return 0


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
