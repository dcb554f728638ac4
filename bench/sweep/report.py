"""The main table's markdown report (imdb-offline.md), written from stored records alone: the cells, the SFT
record and each tier's pairs / reward records. A cell not yet stored shows as "pending" and the report says how to
continue, so that a partial sweep (`--max-cells`) still reads as what it is."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
from pathlib import Path

from madpo.pipeline.config import TIER_NAMES, PipelineConfig

from .builds import build_of, builds_section
from .cells import Cell, aggregate, madpo_loss, paired_difference
from .margin_best import margin_best_section
from .plan import BASELINES, NOISE_MATCHED, Planned

REPO = Path(__file__).resolve().parent.parent.parent

# Rho (2025), arXiv:2510.05342: the main table and the amplification/regularisation ablation (c = 4, τ = 7, read off
# plots ±0.01): mean oracle reward
PAPER: dict[str, dict[str, float]] = {
    "madpo": {"high": 2.23, "medium": 2.23, "low": 1.95},
    "beta_dpo": {"high": 1.67, "medium": 1.84, "low": 1.76},
    # the paper's β-DPO row was made by the MADPO repository's variant of β-DPO
    "beta_dpo_madpo_repo": {"high": 1.67, "medium": 1.84, "low": 1.76},
    "dpo": {"high": 1.62, "medium": 1.71, "low": 1.48},
    "ipo": {"high": 0.35, "medium": 0.31, "low": 0.10},
    "madpo_amp_only": {"high": 2.19, "medium": 2.23, "low": 2.00},
    "madpo_reg_only": {"high": 1.71, "medium": 1.70, "low": 1.51},
}


def shown(path: Path | str) -> str:
    """A path as a report shows it: relative to the repository when inside it (no machine's home in the file)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def fmt(agg: dict | None) -> str:
    if agg is None:
        return "–"
    return f"{agg['mean']:.3f} ± {agg['se']:.3f} (KL {agg['kl']:.1f})"


def header(
    title: str,
    cfg: PipelineConfig,
    argv: list[str],
    wall: float,
    cells: list[Cell],
    pairs_ctx: dict[str, dict] | None = None,
) -> list[str]:
    """The lines every report starts with: command, machine, hyperparameters and data sizes."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cell_time = sum(c.policy_seconds + c.eval_seconds for c in cells)
    loss = madpo_loss(cfg.policy)
    if pairs_ctx:
        counts = ", ".join(f"{t} {c['n_train']} / {c['n_eval']}" for t, c in pairs_ctx.items())
        data = f"train / eval pairs per tier (after dropping identical or empty pairs): {counts}"
    else:
        n_train = cfg.data.n_prompts - cfg.pairs.n_eval if cfg.pairs.n_train is None else cfg.pairs.n_train
        data = f"{n_train} train pairs per tier"
    return [
        f"# {title}",
        "",
        f"- Command: `python bench/reproduce.py {shlex.join(argv)}`",
        f"- Machine writing this report: {platform.machine()}, {os.cpu_count()} CPUs, load average now {load}; this "
        f"invocation took {wall / 60:.1f} min wall; the cells' own stage times add up to {cell_time / 60:.1f} min "
        "(stored and cached cells count the time they took when they ran, on whichever machine ran them).",
        f"- Same hyperparameters for every method (the config's policy section): lr {cfg.policy.lr:g}, "
        f"β {loss.beta:g}, batch {cfg.policy.batch_size}×{cfg.policy.accumulate_grad_batches}, {cfg.policy.epochs} "
        f"epochs, warmup {cfg.policy.warmup_ratio:g}, {cfg.policy.schedule}; MADPO c_max {loss.c_max:g}, "
        f"τ {loss.tau:.4g}.",
        f"- Data: {data}; evaluation on {cfg.n_eval_prompts} held-out prompts, {cfg.evaluate.max_new_tokens} new "
        "tokens, oracle reward in [−3, 3].",
        "",
    ]


def pending_section(pending: list[Planned], cells_dir: Path, continue_argv: list[str]) -> list[str]:
    """The cells not yet stored and the command that runs them (it skips every stored one)."""
    if not pending:
        return []
    lines = [
        "",
        f"## Pending cells ({len(pending)})",
        "",
        f"Not yet in `{shown(cells_dir)}`; the rows above that show them are incomplete. Continue with (every stored "
        "cell is skipped, `--max-cells N` stops after N more):",
        "",
        f"    python bench/reproduce.py {shlex.join(continue_argv)}",
        "",
    ]
    lines += [f"- {p.label} `{p.key}`" for p in pending]
    return lines


def main_table(
    cfg: PipelineConfig,
    argv: list[str],
    wall: float,
    cells: list[Cell],
    sft: dict,
    pairs_ctx: dict[str, dict] | None = None,
    reward_ctx: dict[str, dict] | None = None,
    pending: list[Planned] | None = None,
    cells_dir: Path | None = None,
    continue_argv: list[str] | None = None,
    builds: dict[str, dict] | None = None,
) -> str:
    """imdb-offline.md: the table, MADPO against the baselines and the competitors, the margins it reads, and the
    input builds the cells were trained on (`builds`: every stored build's records, bench/sweep/builds.py)."""
    pairs_ctx, reward_ctx, pending = pairs_ctx or {}, reward_ctx or {}, pending or []
    table_pending = [p for p in pending if p.report == "table"]
    methods = list(dict.fromkeys([c.method for c in cells] + [p.method for p in table_pending]))
    # rows in the order of the command's --methods (a method pending on the first tier would otherwise come last)
    listed = argv[argv.index("--methods") + 1].split(",") if "--methods" in argv[:-1] else []
    methods.sort(key=lambda m: listed.index(m) if m in listed else len(listed))
    tiers = [t for t in TIER_NAMES if any(c.tier == t for c in cells) or any(p.policy.tier == t for p in pending)]
    agg = {
        (m, t): aggregate([c for c in cells if c.method == m and c.tier == t])
        for m in methods
        for t in tiers
        if any(c.method == m and c.tier == t for c in cells)
    }
    missing = {(p.method, p.policy.tier) for p in table_pending}

    def entry(m: str, t: str) -> str:
        if (m, t) not in agg:
            return "pending" if (m, t) in missing else "–"
        n_wanted = agg[(m, t)]["n"] + sum(1 for p in table_pending if (p.method, p.policy.tier) == (m, t))
        partial = f" ({agg[(m, t)]['n']}/{n_wanted} seeds, rest pending)" if (m, t) in missing else ""
        return fmt(agg[(m, t)]) + partial

    sft_r = sft["reward"]
    lines = header("IMDB offline: mean oracle reward per method and tier", cfg, argv, wall, cells, pairs_ctx)
    if cells_dir is not None:
        lines.insert(-1, f"- Every cell and record is read from `{shown(cells_dir)}` (bench/cellstore.py).")
    lines += [
        "Mean oracle reward ± SE (SE over seeds when there are several, else the run's SD/√n), KL(π‖π_SFT) in nats "
        "beside it. SFT model (the reference, tier-independent): "
        f"{sft_r['mean']:.3f} ± {sft_r['se']:.3f}.",
        "",
        "| method | " + " | ".join(tiers) + " | paper (" + " / ".join(t[0].upper() for t in tiers) + ") |",
        "|---|" + "---|" * len(tiers) + "---|",
    ]
    for m in methods:
        paper = PAPER.get(m)
        paper_cell = " / ".join(f"{paper[t]:.2f}" for t in tiers) if paper else "–"
        lines.append(f"| {m} | " + " | ".join(entry(m, t) for t in tiers) + f" | {paper_cell} |")
    if pairs_ctx:
        noise = ", ".join(
            f"{t} {c['frac_disagree']:.1%}" for t, c in pairs_ctx.items() if c["frac_disagree"] is not None
        )
        lines += ["", f"Labels that disagree with the oracle (train pairs, per tier): {noise}."]
    if any(m in NOISE_MATCHED.values() for m in methods):
        lines += [
            "",
            "`cdpo_oracle_eps` / `rdpo_oracle_eps`: cDPO / rDPO with ε = the tier's measured share of train labels "
            "that disagree with the oracle. That ε uses the oracle, which no user has: these rows are an upper bound "
            "for the two methods, not a setting one could pick.",
        ]
    lines += _baseline_sections(agg, tiers)
    lines += _beta_dpo_section(cells)
    lines += margin_best_section(cells, tiers)
    lines += _margin_sections(cells, tiers, reward_ctx)
    lines += _decomposition(cfg, cells, methods, tiers)
    lines += builds_section(cells, builds or {})
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg.to_dict(), indent=1), "```", ""]
    lines += [
        "## Cells",
        "",
        "| method | tier | seed | reward ± SE | KL ± SE | policy s | eval s | input build | stage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c.method} | {c.tier} | {c.seed} | {c.mean:.3f} ± {c.se:.3f} | {c.kl:.2f} ± {c.kl_se:.2f} | "
            f"{c.policy_seconds:.0f} | {c.eval_seconds:.0f} | `{build_of(c)}` | `{c.policy_stage}`"
            + (f" (≡ {c.extra['identical_to']})" if "identical_to" in c.extra else "")
            + " |"
        )
    lines += pending_section(pending, cells_dir or Path("."), continue_argv or argv)
    return "\n".join(lines) + "\n"


def _baseline_sections(agg: dict, tiers: list[str]) -> list[str]:
    lines = ["", "## MADPO against the next best baseline", ""]
    lines += ["| tier | MADPO | next best | Δ | relative gain | paper's gain |", "|---|---|---|---|---|---|"]
    paper_gain = {"high": "+33.3%", "medium": "+20.8%", "low": "+10.5%"}
    verdicts = []
    for t in tiers:
        base = [(agg[(b, t)]["mean"], b) for b in BASELINES if (b, t) in agg]
        if ("madpo", t) not in agg or not base:
            continue
        best, name = max(base)
        mad = agg[("madpo", t)]["mean"]
        rel = (mad - best) / abs(best) if best else float("nan")
        lines.append(
            f"| {t} | {mad:.3f} | {name} {best:.3f} | {mad - best:+.3f} | {rel:+.1%} | {paper_gain.get(t, '–')} |"
        )
        # one verdict per β-DPO variant on the tier: the paper ranks one β-DPO, not the two against each other
        variants = [v for v in ("beta_dpo", "beta_dpo_madpo_repo") if (v, t) in agg] or ["beta_dpo"]
        for variant in variants:
            present = [m for m in ("madpo", variant, "dpo", "ipo") if (m, t) in agg]
            order = sorted(present, key=lambda m: -agg[(m, t)]["mean"])
            steps = []
            for a, b in zip(order, order[1:], strict=False):
                d = agg[(a, t)]["mean"] - agg[(b, t)]["mean"]
                noise = 1.96 * math.hypot(agg[(a, t)]["se"], agg[(b, t)]["se"])
                steps.append(f"{a} − {b} = {d:+.3f} ({'resolved' if d > noise else f'within noise ±{noise:.3f}'})")
            verdicts.append(
                f"- tier {t}: measured order {' > '.join(order)}; the paper's order {' > '.join(present)} "
                f"{'holds' if order == present else 'does not hold'} in the means. " + "; ".join(steps) + "."
            )
    lines += [
        "",
        "Relative gain = (MADPO − best baseline) / |best baseline|; it is unstable when the baseline is "
        "near 0, so read Δ too.",
        "",
        "## Does the paper's ordering hold?",
        "",
    ]
    lines += verdicts or ["- (MADPO or the baselines were not in this run)"]
    lines += [
        "",
        "A difference is 'resolved' when it exceeds 1.96·√(SE₁² + SE₂²) (SEs over seeds when there are several).",
    ]
    return lines


def _beta_dpo_section(cells: list[Cell]) -> list[str]:
    """What β-DPO's adaptation did in each of its cells (both variants): the batch β and kept share it trained with
    (last-epoch means, from the cell's `train_metrics`; cells stored before those were kept are left out)."""
    variants = ("beta_dpo", "beta_dpo_madpo_repo", "beta_dpo_filter_only")
    rows = [c for c in cells if c.method in variants and "train/beta/effective" in (c.train_metrics or {})]
    if not rows:
        return []
    lines = [
        "",
        "## β-DPO's batch β",
        "",
        "| method | tier | seed | β_batch | steps below the floor | kept share | gap EMA μ / s | reward ± SE | KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(rows, key=lambda c: (variants.index(c.method), TIER_NAMES.index(c.tier), c.seed)):
        m = c.train_metrics or {}
        floor = f"{m['train/beta_dpo/clamped']:.0%}" if "train/beta_dpo/clamped" in m else "–"
        lines.append(
            f"| {c.method} | {c.tier} | {c.seed} | {m['train/beta/effective']:.4f} | {floor} "
            f"| {m.get('train/beta_dpo/kept', math.nan):.2f} "
            f"| {m.get('train/beta_dpo/gap_mean', math.nan):.2f} / {m.get('train/beta_dpo/gap_std', math.nan):.2f} "
            f"| {c.mean:.3f} ± {c.se:.3f} | {c.kl:.2f} |"
        )
    lines += [
        "",
        "Means over each run's last epoch. `beta_dpo` (the official code): β_batch = max(β_min, β0·(1 + α·(mean kept "
        "gap − μ))) per optimiser step, where the gap is the implicit margin h (not β-scaled) and μ, s its EMAs; a "
        "step at the floor β_min barely trains. `beta_dpo_madpo_repo` (the MADPO repository's, behind the paper's "
        "β-DPO row): the gap is β0·h, β_batch = β0·(1 + α·(mean gap − μ)) over all pairs and is not clamped, so "
        "'below the floor' counts steps with β_batch < β_min, negative ones included (docs/method.md). A β_batch "
        "above β0 holds the policy closer to the reference. `beta_dpo_filter_only`: the repository's variant with "
        "α = 0, so β_batch = β0 at every step and only the data filter acts (the ablation that says which of the two "
        "moves the variant's result). '–': the cell was stored before the floor was logged.",
    ]
    return lines


def _margin_sections(cells: list[Cell], tiers: list[str], reward_ctx: dict[str, dict]) -> list[str]:
    lines: list[str] = []
    # per tier, a MADPO cell of the build whose reward record the row quotes beside it (the first stored), so that
    # the row's numbers are one reward model's
    margin_rows: dict[str, dict] = {}
    for t in tiers:
        own = [c for c in cells if c.tier == t and c.method == "madpo" and c.margins]
        first = build_of(reward_ctx[t]) if reward_ctx.get(t) else None
        chosen = next((c for c in own if build_of(c) == first), own[0] if own else None)
        if chosen is not None:
            margin_rows[t] = chosen.margins
    if margin_rows:
        lines += [
            "",
            "## The reward model's margins (what MADPO's weight sees)",
            "",
            "On each tier's training pairs: how often the margin m agrees with the (noisy) label and with the oracle, "
            "its spread, and the share of pairs in each region of w(m). An RM near chance makes w ≈ 1 ± noise, so "
            "MADPO ≈ DPO.",
            "",
            "| tier | RM val accuracy | agrees with oracle | corr(m, oracle gap) | sd(m) | m < 0 (down-weighted) | "
            "0 < m < τ (amplified) | m ≥ τ (damped) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t, m in margin_rows.items():
            acc = (reward_ctx.get(t) or {}).get("rm_val_accuracy")
            corr = m.get("corr_with_oracle_gap")
            lines.append(
                f"| {t} | {'–' if acc is None else f'{acc:.3f}'} | {m['agrees_with_oracle']:.3f} | "
                f"{'–' if corr is None else f'{corr:+.3f}'} | {m['sd']:.3f} | "
                f"{m['frac_downweighted_negative'] + m['frac_capped_below_minus_tau']:.1%} | "
                f"{m['frac_amplified_0_to_tau']:.1%} | {m['frac_damped_above_tau']:.1%} |"
            )
    down = {t: c["downweighted"] for t, c in reward_ctx.items() if c.get("downweighted")}
    if down:
        lines += [
            "",
            "What the down-weighting acts on: the training pairs with m < 0 (MADPO's weight there is "
            "σ(c·m)/σ(m) < 1) against the rest — how often their label agrees with the oracle, how often the chosen "
            "side is the original human review (medium/low tiers), and their mean weight.",
            "",
            "| tier | pairs with m < 0 | label agrees with oracle: m < 0 / m ≥ 0 | chosen is the original review: "
            "m < 0 / m ≥ 0 | mean w: m < 0 / m ≥ 0 |",
            "|---|---|---|---|---|",
        ]
        for t, d in down.items():
            lines.append(
                f"| {t} | {d['frac']:.1%} | {d['label_right_neg']:.2f} / {d['label_right_pos']:.2f} | "
                f"{d['original_neg']:.2f} / {d['original_pos']:.2f} | {d['w_neg']:.2f} / {d['w_pos']:.2f} |"
            )
    return lines


def _decomposition(cfg: PipelineConfig, cells: list[Cell], methods: list[str], tiers: list[str]) -> list:
    variants = [m for m in methods if m.startswith("madpo_")]
    if not variants:
        return []
    lines = ["", "## Which part of the weight carries the gain (decomposition)", ""]
    lines += [
        "w(m) amplifies hard agreeing pairs (0 < m < τ), down-weights contradicted pairs (m < 0) and damps easy "
        "ones (m > τ). `no_downweight` clips w ≥ 1, `no_amplify` clips w ≤ 1; amp-only / reg-only as eq. (17) of "
        "docs/method.md. Δ vs DPO per tier, paired by seed within an input build (the number of seeds in "
        "brackets); where a variant has fewer seeds than MADPO, MADPO's Δ on the same seeds beside it:",
        "",
        "| variant | " + " | ".join(tiers) + " |",
        "|---|" + "---|" * len(tiers),
    ]

    def of(m: str, t: str) -> list[Cell]:
        return [c for c in cells if c.method == m and c.tier == t]

    for m in ["madpo", *variants]:
        row = []
        for t in tiers:
            d = paired_difference(of(m, t), of("dpo", t))
            if d is None:
                row.append("–")
                continue
            text = f"{d['mean']:+.3f} ({d['n']})"
            runs = {(c.seed, build_of(c)) for c in of(m, t)}
            same = paired_difference([c for c in of("madpo", t) if (c.seed, build_of(c)) in runs], of("dpo", t))
            full = paired_difference(of("madpo", t), of("dpo", t))
            if m != "madpo" and same is not None and full is not None and same["n"] < full["n"]:
                text += f"; MADPO {same['mean']:+.3f}"
            row.append(text)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    same = {(c.method, c.tier): c.extra for c in cells if "identical_to" in c.extra}
    if same:
        lines.append("")
    for (m, t), extra in sorted(same.items(), key=lambda kv: (kv[0][0], TIER_NAMES.index(kv[0][1]))):
        exact = next((c.margins for c in cells if c.method == "madpo" and c.tier == t and c.margins), None)
        check = ""
        if exact is not None:  # the run's own margins (trainer precision): none may reach ±τ
            beyond = exact["frac_damped_above_tau"] + exact["frac_capped_below_minus_tau"]
            check = f"; the MADPO run's own margins: {beyond:.0%} at or beyond ±τ"
        lines.append(
            f"- {m} on {t} is the {extra['identical_to']} run of the same seed, not trained again: every training "
            f"margin lies inside ±τ (max |m| = {extra['max_abs_margin']:.2f} < "
            f"τ = {madpo_loss(cfg.policy).tau:.2f}){check}, "
            f"where its weight equals {extra['identical_to']}'s exactly (eq. (17) of docs/method.md). "
            "`--train-identical` trains it anyway."
        )
    return lines


def cells_json(cells: list[Cell]) -> list[dict]:
    return [dataclasses.asdict(c) for c in cells]
