"""The reward-quality curve: MADPO − DPO as a function of how good MADPO's margins are, from perfect to chance.

MADPO's weight w(m) reads a reward-model margin m per pair. Whether it helps depends on how good m is, and the
pipeline's reward models sit at one point of that axis (bench/results/imdb-offline.md: near chance). Here the margins
come from a synthetic source of known quality instead (`policy.margin_source`, `madpo.pipeline.margins`): the pair's
oracle gap g, the very logit its label was drawn from (docs/method.md eq. (36)), plus N(0, σ²) noise for each σ level,
and `random` margins independent of the pair on the gaps' scale; the trained reward model is one more point. The
x-axes are the margins' measured quality on the training pairs (oracle agreement, BT loss above the Bayes loss, from
the policy stage's `margin_quality`), the y-axis MADPO − DPO in mean oracle reward (paired by seed, 95 % CI over
seeds) and in KL(π‖π_SFT).

    python bench/rm_quality_curve.py -c configs/pipeline/imdb_1k.yaml --jobs 2          # the full curve (long)
    python bench/rm_quality_curve.py -c configs/pipeline/imdb_1k.yaml --tiers high --seeds 0 --levels 0,random

Every finished cell (one trained and evaluated policy) is stored in `bench/results/cells/rm_quality_curve/`
(`bench/cellstore.py`): a rerun, here or on another machine, skips it, and when every cell is stored the report is
regenerated without building a single pipeline stage. Commit the cell files as they finish. A machine that resumes
the curve rebuilds the SFT model, the pairs and the reward models, which differ bitwise on another CPU
(bench/sweep/builds.py): each cell stores the build it read, and MADPO is paired with the DPO cell of its own seed
and build only. Any option not listed below is a pipeline flag (`--policy.lr`, `--output_dir`, ...); DPO and MADPO
get the config's `policy` section with only method, tier, seed and the margin source changed. Writes
`rm_quality_curve.md` (+ `.json`, `.png`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as bench/reproduce.py does

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # the bench modules import as siblings, whether run as a script or loaded by a test
    sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
from cellstore import CellStore, cell_spec  # noqa: E402
from rm_quality import VARIANTS, variant_config  # noqa: E402
from sweep.builds import InputBuild, array_digest, build_of, shared_build  # noqa: E402
from sweep.cells import Cell, run_cell  # noqa: E402

from madpo.pipeline.config import TIER_NAMES, PipelineConfig, PolicyConfig  # noqa: E402
from madpo.pipeline.run import configure_logging, parse_config  # noqa: E402
from madpo.pipeline.stages import Pipeline, load_pairs, policy_label, say, write_json_atomic  # noqa: E402

REPO = BENCH.parent
CELLS = REPO / "bench" / "results" / "cells" / "rm_quality_curve"
RM_LEVEL = "reward_model"
"""The level name of MADPO with the tier's trained reward model."""


def curve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="MADPO − DPO against the quality of MADPO's margins (synthetic margin sources and the trained RM)",
        epilog="Any other argument is a pipeline flag, e.g. -c configs/pipeline/imdb_1k.yaml --policy.lr 1e-4",
    )
    p.add_argument("--tiers", default="high,low", help="comma-separated tiers")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated policy seeds (paired between DPO and MADPO)")
    p.add_argument(
        "--levels", default="0,0.5,1,2,4,random", help="oracle-margin noise σ levels, and 'random' for chance margins"
    )
    p.add_argument("--no-reward-model", action="store_true", help="leave out MADPO with the trained reward model")
    p.add_argument(
        "--rm-variants",
        default="config",
        help="the trained reward models placed on the curve: variants of bench/rm_quality.py (config: the config's)",
    )
    p.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--cells-dir", default=str(CELLS), help="where finished cells are stored and found")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the pending cells (threads split)")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "k/n": a --jobs worker runs cells k, k+n, ...
    return p


def _items(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_levels(text: str) -> list[str]:
    """The levels as names: σ values normalised ('0.50' -> '0.5'), 'random' as is; a bad one stops the run."""
    out = []
    for v in _items(text):
        if v == "random":
            out.append(v)
            continue
        try:
            sigma = float(v)
        except ValueError:
            raise SystemExit(f"rm_quality_curve: level {v!r} is neither a noise σ nor 'random'") from None
        if not sigma >= 0:
            raise SystemExit(f"rm_quality_curve: level {v!r}: σ must be >= 0")
        out.append(f"{sigma:g}")
    return out


@dataclasses.dataclass(frozen=True)
class Planned:
    """One cell to have: its policy config, the level it stands for ('dpo' for the baseline) and its store spec."""

    policy: PolicyConfig
    level: str
    spec: dict
    rm_variant: str | None = None


def rm_level(variant: str) -> str:
    """The level name of MADPO with a reward-model variant's margins (`RM_LEVEL` for the config's own)."""
    return RM_LEVEL if variant == "config" else f"{RM_LEVEL}:{variant}"


def plan(opts: argparse.Namespace, cfg: PipelineConfig) -> list[Planned]:
    """Per (tier, seed): DPO once, MADPO per level, and MADPO with each reward-model variant (unless left out)."""
    base = dataclasses.replace(cfg.policy, margin_source="reward_model", margin_source_noise_std=0.0)
    variants = [] if opts.no_reward_model else _items(opts.rm_variants)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"rm_quality_curve: unknown reward-model variant {v!r}; expected some of {list(VARIANTS)}")
    levels = parse_levels(opts.levels)
    out = []
    for tier in _items(opts.tiers):
        for seed in (int(s) for s in _items(opts.seeds)):
            cells = [("dpo", dataclasses.replace(base, method="dpo", tier=tier, seed=seed))]
            for level in levels:
                source = "random" if level == "random" else "oracle"
                sigma = float(level) if source == "oracle" else 0.0
                madpo = dataclasses.replace(
                    base, method="madpo", tier=tier, seed=seed, margin_source=source, margin_source_noise_std=sigma
                )
                cells.append((level, madpo))
            out += [Planned(p, level, cell_spec(cfg, p, source=level)) for level, p in cells]
            madpo = dataclasses.replace(base, method="madpo", tier=tier, seed=seed)
            for v in variants:
                # the variant's reward section tells the cells apart: the level's name stays out of the spec
                spec = cell_spec(variant_config(cfg, v), madpo, source=RM_LEVEL)
                out.append(Planned(madpo, rm_level(v), spec, rm_variant=v))
    return out


def quality(pipe: Pipeline, policy: PolicyConfig, stage_stats: dict) -> dict | None:
    """The margins' quality on the training pairs: the policy stage's `margin_quality`; for a reward-model run
    cached before the stage recorded it, recomputed from the margins scored again (float32 on the CPU)."""
    if "margin_quality" in stage_stats or not policy.uses_margins:
        return stage_stats.get("margin_quality")
    from madpo.pipeline.rm_quality import rm_quality

    m = pipe.train_margins(policy.tier)
    rows = load_pairs(pipe.pairs(), policy.tier, "train")
    if len(rows) != len(m):  # a pair the tokenizer dropped: the alignment by position would be wrong
        return None
    return rm_quality(m, [r["oracle_chosen"] - r["oracle_rejected"] for r in rows])


def run_one(pipes: Pipelines, store: CellStore, item: Planned) -> dict:
    """Train (or find in the stage cache) and evaluate one cell, and store it."""
    pipe = pipes(item.rm_variant)
    cell = run_cell(pipe, item.policy, pipes.inputs(item))
    stats = pipe.policy(item.policy).stats  # memoised: the stage run_cell just ran
    result = {"level": item.level, "cell": dataclasses.asdict(cell), "quality": quality(pipe, item.policy, stats)}
    return store.put(item.spec, result, name=policy_label(item.policy))


class Pipelines:
    """One `Pipeline` per reward-model variant, built when first asked for (they share the stage output dir)."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.built: dict[str | None, Pipeline] = {}

    def __call__(self, variant: str | None) -> Pipeline:
        if variant not in self.built:
            self.built[variant] = Pipeline(self.cfg if variant is None else variant_config(self.cfg, variant))
        return self.built[variant]

    def inputs(self, item: Planned) -> InputBuild:
        """What the cell reads: the shared build (one for all variants: they change the reward section only, so
        they share the SFT model and the pairs) and, for a reward-model point, that variant's margins."""
        if not hasattr(self, "_shared_build"):
            self._shared_build = shared_build(self(None))
        if item.rm_variant is None:  # a synthetic source: its margins follow from the pairs, the seed and σ
            return InputBuild(self._shared_build)
        return InputBuild(self._shared_build, array_digest(self(item.rm_variant).train_margins(item.policy.tier)))


def run_workers(opts: argparse.Namespace, argv: list[str], cfg: PipelineConfig) -> None:
    """`--jobs n`: n copies of this script, worker k running the pending ones of planned cells k, k+n, ..., each
    storing what it finishes (they share the stage output dir and the store, nothing else)."""
    threads = max(1, (cfg.trainer.num_threads or os.cpu_count() or 1) // opts.jobs)
    procs = []
    for k in range(opts.jobs):
        cmd = [sys.executable, __file__, *argv, "--shard", f"{k}/{opts.jobs}"]
        procs.append(subprocess.Popen([*cmd, "--trainer.num_threads", str(threads), "--trainer.progress_bar", "false"]))
    failed = [k for k, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise SystemExit(f"rm_quality_curve: workers {failed} failed (see above); their finished cells are stored")


# ------------------------------------------------------------------------------------------------------------------
# The curve, from the stored cells
# ------------------------------------------------------------------------------------------------------------------


def paired_difference(madpo: list[float], dpo: list[float], se: list[tuple[float, float]]) -> dict:
    """Mean of the per-seed differences MADPO − DPO with a 95 % CI: Student t over seeds (n ≥ 2), else the one
    run's within-run interval 1.96·√(SE_MADPO² + SE_DPO²) (unpaired over prompts, so conservative)."""
    from scipy import stats

    d = np.asarray(madpo) - np.asarray(dpo)
    n = len(d)
    if n >= 2:
        half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
        kind = f"t over {n} seeds"
    else:
        half, kind = 1.96 * math.hypot(*se[0]), "within run"
    return {"mean": float(d.mean()), "lo": float(d.mean()) - half, "hi": float(d.mean()) + half, "n": n, "ci": kind}


def _mean(values: list[Any]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _by_run(records: list[tuple[Planned, dict]]) -> dict[tuple[str, str, int, str], dict]:
    """The stored results by (tier, level, seed, input build)."""
    return {(i.policy.tier, i.level, i.policy.seed, build_of(r["cell"])): r for i, r in records}


def curve_rows(records: list[tuple[Planned, dict]]) -> list[dict]:
    """One row per (tier, level) with MADPO's and DPO's cells of the same seeds and input builds: quality (mean over
    seeds) and the paired differences in reward and KL. A MADPO cell whose seed's DPO cell was trained on another
    build has no pair (`unpaired`): the two read different pairs, so their difference is not MADPO's effect."""
    by = _by_run(records)
    rows = []
    for tier in [t for t in TIER_NAMES if any(k[0] == t for k in by)]:
        levels = list(dict.fromkeys(k[1] for k in by if k[0] == tier and k[1] != "dpo"))
        for level in levels:
            runs = sorted((s, b) for t, lv, s, b in by if t == tier and lv == level and (tier, "dpo", s, b) in by)
            if not runs:
                continue
            mad = [Cell(**by[(tier, level, *run)]["cell"]) for run in runs]
            dpo = [Cell(**by[(tier, "dpo", *run)]["cell"]) for run in runs]
            q = [by[(tier, level, *run)]["quality"] or {} for run in runs]
            rows.append(
                {
                    "tier": tier,
                    "level": level,
                    "seeds": [s for s, _ in runs],
                    "builds": sorted({b for _, b in runs}),
                    **{k: _mean([x.get(k) for x in q]) for k in ("oracle_agreement", "bt_excess", "corr")},
                    "madpo_reward": float(np.mean([c.mean for c in mad])),
                    "dpo_reward": float(np.mean([c.mean for c in dpo])),
                    "d_reward": paired_difference(
                        [c.mean for c in mad], [c.mean for c in dpo], [(mad[0].se, dpo[0].se)]
                    ),
                    "d_kl": paired_difference([c.kl for c in mad], [c.kl for c in dpo], [(mad[0].kl_se, dpo[0].kl_se)]),
                }
            )
    return rows


def unpaired(records: list[tuple[Planned, dict]]) -> list[str]:
    """The MADPO cells with no DPO cell of the same tier, seed and input build, as 'tier level sN (build)'."""
    by = _by_run(records)
    return [f"{t} {level_name(lv)} s{s} (`{b}`)" for t, lv, s, b in by if lv != "dpo" and (t, "dpo", s, b) not in by]


def level_name(level: str) -> str:
    if level.startswith(RM_LEVEL):
        return "reward model" + (f" `{level.split(':', 1)[1]}`" if ":" in level else " (the config's)")
    return {"random": "random"}.get(level, f"oracle + N(0, {level}²)")


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex="col")
    colors = dict(zip(TIER_NAMES, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for col, (x_key, x_label) in enumerate(
        [("oracle_agreement", "oracle agreement of the margins"), ("bt_excess", "BT loss − Bayes BT loss (nats)")]
    ):
        for row, (y_key, y_label) in enumerate(
            [("d_reward", "MADPO − DPO, mean oracle reward"), ("d_kl", "MADPO − DPO, KL (nats)")]
        ):
            ax = axes[row][col]
            for tier in dict.fromkeys(r["tier"] for r in rows):
                for rm in (False, True):
                    pts = sorted(
                        (
                            r
                            for r in rows
                            if r["tier"] == tier and r["level"].startswith(RM_LEVEL) == rm and r[x_key] is not None
                        ),
                        key=lambda r: r[x_key],
                    )
                    if not pts:
                        continue
                    y = [r[y_key]["mean"] for r in pts]
                    err = [
                        [v - r[y_key]["lo"] for v, r in zip(y, pts, strict=True)],
                        [r[y_key]["hi"] - v for v, r in zip(y, pts, strict=True)],
                    ]
                    ax.errorbar(
                        [r[x_key] for r in pts],
                        y,
                        yerr=err,
                        color=colors[tier],
                        marker="*" if rm else "o",
                        markersize=12 if rm else 5,
                        linestyle="none" if rm else "-",
                        capsize=3,
                        label=f"{tier}: {'reward model' if rm else 'synthetic margins'}",
                    )
                    for r, yv in zip(pts, y, strict=True):
                        if rm:
                            name = r["level"].split(":", 1)[1] if ":" in r["level"] else "RM"
                        else:
                            name = r["level"] if r["level"] == "random" else f"σ={r['level']}"
                        ax.annotate(
                            name,
                            (r[x_key], yv),
                            textcoords="offset points",
                            xytext=(4, 4),
                            fontsize=7,
                        )
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.grid(alpha=0.3)
            ax.set_ylabel(y_label)
            if row == 1:
                ax.set_xlabel(x_label)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("MADPO − DPO against margin quality (paired by seed, 95 % CI)")
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    plt.close(fig)


def _f(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it (no machine's home in the file)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _ci(d: dict, spec: str = "+.3f") -> str:
    return f"{d['mean']:{spec}} [{d['lo']:{spec}}, {d['hi']:{spec}}]"


def write_report(
    opts: argparse.Namespace, argv: list[str], cfg: PipelineConfig, records: list[tuple[Planned, dict]], n_planned: int
) -> dict[str, Path]:
    """`rm_quality_curve.md` / `.json` / `.png` under --results-dir, from the stored cells alone."""
    out = Path(opts.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [(i, r["result"]) for i, r in records]
    rows = curve_rows(results)
    paths = {
        "md": out / "rm_quality_curve.md",
        "json": out / "rm_quality_curve.json",
        "png": out / "rm_quality_curve.png",
    }
    if rows:
        plot(rows, paths["png"])
    machines = sorted({r["machine"]["processor"] for _, r in records})
    lines = [
        "# Reward-quality curve: MADPO − DPO against the quality of MADPO's margins",
        "",
        f"- Command: `python bench/rm_quality_curve.py {shlex.join(argv)}`",
        f"- {len(records)} of {n_planned} cells stored in `{_shown(Path(opts.cells_dir))}`; "
        f"they ran on: {', '.join(machines) or '–'}; this report was written on {platform.machine()} at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"- Policy hyperparameters (the same for DPO and MADPO): lr {cfg.policy.lr:g}, batch "
        f"{cfg.policy.batch_size}×{cfg.policy.accumulate_grad_batches}, {cfg.policy.epochs} epochs; evaluation on "
        f"{cfg.n_eval_prompts} held-out prompts.",
        "",
        "MADPO's margins: the pair's oracle gap g = r*(chosen) − r*(rejected) (the labels are Bradley–Terry draws from "
        "it, so σ = 0 is the perfect reward model) plus N(0, σ²) noise; `random`: N(0, sd(g)²) independent of the pair "
        "(chance); `reward model`: the tier's trained Bradley–Terry model. Quality on the training pairs (mean over "
        "seeds): oracle agreement = share of pairs with g ≠ 0 where sign(m) = sign(g); BT excess = mean −log σ(m) − "
        "mean −log σ(g) against the same labels (0 at the truth). Δ = MADPO − DPO per seed, mean and 95 % CI.",
        "",
    ]
    if rows:
        lines += [f"![curve]({paths['png'].name})", ""]
    lines += [
        "| tier | margins | seeds | oracle agreement | BT excess | corr(m, g) | MADPO reward | DPO reward | Δ reward "
        "[95 % CI] | Δ KL [95 % CI] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tier']} | {level_name(r['level'])} | {len(r['seeds'])} | {_f(r['oracle_agreement'])} | "
            f"{_f(r['bt_excess'], '+.3f')} | {_f(r['corr'], '+.3f')} | {r['madpo_reward']:.3f} | {r['dpo_reward']:.3f} "
            f"| {_ci(r['d_reward'])} | {_ci(r['d_kl'], '+.2f')} |"
        )
    builds = sorted({build_of(r["result"]["cell"]) for _, r in records})
    if len(builds) > 1:
        lines += [
            "",
            f"The cells were trained on {len(builds)} input builds ({', '.join(f'`{b}`' for b in builds)}): the SFT "
            "model, pairs and reward models rebuilt on another machine differ bitwise, so Δ pairs a MADPO cell with "
            "the DPO cell of its own seed and build only.",
        ]
    if lost := unpaired(results):
        lines += ["", f"No DPO cell of their seed and build, so left out of Δ: {'; '.join(lost)}."]
    lines += [
        "",
        "## Cells",
        "",
        "| method | tier | seed | margins | reward ± SE | KL ± SE | machine | build | cell file |",
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for item, record in records:
        c = record["result"]["cell"]
        lines.append(
            f"| {item.policy.name} | {c['tier']} | {c['seed']} | "
            f"{'–' if item.level == 'dpo' else level_name(item.level)} "
            f"| {c['mean']:.3f} ± {c['se']:.3f} | {c['kl']:.2f} ± {c['kl_se']:.2f} | {record['machine']['processor']} "
            f"| `{build_of(c)}` | `{c['policy_stage']}` |"
        )
    paths["md"].write_text("\n".join(lines) + "\n")
    write_json_atomic(
        paths["json"], {"argv": argv, "rows": rows, "cells": [{"level": i.level, **r} for i, r in records]}
    )
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = curve_parser().parse_known_args(argv)
    cfg = parse_config(rest)
    cfg.validate()
    for t in _items(opts.tiers):
        if t not in TIER_NAMES:
            raise SystemExit(f"rm_quality_curve: unknown tier {t!r}; expected some of {list(TIER_NAMES)}")
    configure_logging()
    store = CellStore(Path(opts.cells_dir))
    planned = plan(opts, cfg)
    pending = [p for p in planned if store.get(p.spec) is None]
    say(f"rm_quality_curve: {len(planned)} cells, {len(pending)} to run, {len(planned) - len(pending)} stored")
    if pending:  # the pipeline (and its stage cache) only when there is something to train
        if cfg.trainer.num_threads:
            import torch

            torch.set_num_threads(cfg.trainer.num_threads)
        pipes = Pipelines(cfg)
        if opts.shard:
            # a share of the plan, not of the pending list: each worker reads the store when it starts, after the
            # other may have stored a cell, so shares of the pending list could overlap and train a cell twice
            k, n = (int(v) for v in opts.shard.split("/"))
            for i, item in enumerate(planned[k::n], 1):
                if store.get(item.spec) is None:
                    say(f"rm_quality_curve worker {k}/{n}: cell {i}: {policy_label(item.policy)}")
                    run_one(pipes, store, item)
            return {}
        if opts.jobs > 1:
            pipes(None).pairs()  # upstream stages and the reward models here, so that no two workers train one twice
            for variant, tier in sorted({(p.rm_variant, p.policy.tier) for p in pending if p.rm_variant}):
                pipes(variant).reward(tier)
            run_workers(opts, argv, cfg)
        else:
            for i, item in enumerate(pending, 1):
                say(f"rm_quality_curve: cell {i}/{len(pending)}: {policy_label(item.policy)}")
                run_one(pipes, store, item)
                write_report(opts, argv, cfg, [(p, r) for p in planned if (r := store.get(p.spec))], len(planned))
    records = [(p, r) for p in planned if (r := store.get(p.spec))]
    paths = write_report(opts, argv, cfg, records, len(planned))
    say(f"rm_quality_curve: wrote {paths['md']}")
    return paths


if __name__ == "__main__":
    main()
