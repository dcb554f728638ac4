"""The reward–KL frontier (a PNG and its table) and the margin-robustness report, written from stored cells."""

from __future__ import annotations

from pathlib import Path

from madpo.pipeline.config import PipelineConfig

from .cells import Cell, aggregate
from .report import header

COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:gray", "tab:olive")


def interpolate(curve: list[tuple[float, float]], kl: float) -> float | None:
    """The reward of a frontier (points (KL, reward) sorted by KL) at `kl`, linear between its neighbours; None
    outside its KL range (no extrapolation)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 <= kl <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return curve[0][1] if len(curve) == 1 and curve[0][0] == kl else None


def matched_kl_lines(curves: dict[str, list[tuple[float, float]]], knob: str) -> list[str]:
    """MADPO against each other method at the same KL: at every knob value of the other method, MADPO's frontier
    interpolated at that point's KL, and at every knob value of MADPO, the other method's frontier interpolated at
    MADPO's KL (means over seeds; no interval, a reading of the curves)."""
    mad = curves.get("madpo")
    if not mad or len(curves) < 2:
        return []
    lines = [
        "",
        "At matched KL: at each point of another method, MADPO's frontier (mean over seeds, linear between its "
        f"{knob} values) read at that point's KL. Outside MADPO's KL range there is nothing to compare.",
        "",
        "| method | its KL | its reward | MADPO at that KL | MADPO − method |",
        "|---|---|---|---|---|",
    ]
    others = {m: c for m, c in curves.items() if m != "madpo"}
    for method, curve in others.items():
        for kl, reward in curve:
            at = interpolate(mad, kl)
            gain = "outside MADPO's range" if at is None else f"{at - reward:+.3f}"
            lines.append(f"| {method} | {kl:.2f} | {reward:.3f} | {'–' if at is None else f'{at:.3f}'} | {gain} |")
    curved = {m: c for m, c in others.items() if len(c) > 1}  # a single point has no frontier to read
    if not curved:
        return lines
    lines += [
        "",
        "And the other way round: at each point of MADPO's frontier, the other method's frontier read at its KL.",
        "",
        "| MADPO's KL | MADPO's reward | method | method at that KL | MADPO − method |",
        "|---|---|---|---|---|",
    ]
    for kl, reward in mad:
        for method, curve in curved.items():
            at = interpolate(curve, kl)
            gain = f"outside {method}'s range" if at is None else f"{reward - at:+.3f}"
            lines.append(f"| {kl:.2f} | {reward:.3f} | {method} | {'–' if at is None else f'{at:.3f}'} | {gain} |")
    return lines


def against_dpo_lines(curves: dict[str, list[tuple[float, float]]], knob: str) -> list[str]:
    """Every other method's points against DPO's frontier: DPO reads no margins and no filter, so its curve over the
    knob is what moving the policy further costs and buys on its own; a method's gain at its own KL is its gain over
    that. Linear between DPO's knob values (the frontier bends down, so this reads DPO a little low); None outside
    DPO's KL range."""
    dpo = curves.get("dpo")
    if not dpo or len(dpo) < 2 or len(curves) < 2:
        return []
    lines = [
        "",
        f"Against DPO's frontier: each other method's point, and DPO's frontier (mean over seeds, linear between its "
        f"{knob} values) read at that point's KL. A gain at the same {knob} that vanishes here came from moving "
        "further from the reference, which DPO buys along its own frontier.",
        "",
        "| method | its KL | its reward | DPO at that KL | method − DPO |",
        "|---|---|---|---|---|",
    ]
    for method, curve in curves.items():
        if method == "dpo":
            continue
        for kl, reward in curve:
            at = interpolate(dpo, kl)
            gain = "outside DPO's range" if at is None else f"{reward - at:+.3f}"
            lines.append(f"| {method} | {kl:.2f} | {reward:.3f} | {'–' if at is None else f'{at:.3f}'} | {gain} |")
    return lines


def frontier_report(
    cfg: PipelineConfig, argv: list[str], wall: float, cells: list[Cell], knob: str, out_dir: Path
) -> str:
    """reward_kl_frontier.md (+ .png beside it): each method over the knob's grid, mean over seeds per value, MADPO
    against the others at matched KL, and every method against DPO's frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    summary: list[str] = []
    curves: dict[str, list[tuple[float, float]]] = {}  # method -> (KL, reward) per knob value, by KL
    methods = sorted({c.method for c in cells}, key=lambda m: (m != "dpo", m != "madpo", m))
    for method, color in zip(methods, COLORS, strict=False):
        mine = [c for c in cells if c.method == method]
        ax.scatter([c.kl for c in mine], [c.mean for c in mine], color=color, alpha=0.3, s=14)  # each seed
        points = []
        for v in sorted({c.extra[knob] for c in mine}):
            points.append((v, aggregate([c for c in mine if c.extra[knob] == v])))  # mean over seeds per knob value
        points.sort(key=lambda p: p[1]["kl"])
        kl, mean = [a["kl"] for _, a in points], [a["mean"] for _, a in points]
        curves[method] = list(zip(kl, mean, strict=True))
        ax.errorbar(
            kl,
            mean,
            xerr=[1.96 * a["kl_se"] for _, a in points],
            yerr=[1.96 * a["se"] for _, a in points],
            marker="o",
            color=color,
            label=method,
            capsize=3,
        )
        for (v, a), x, y in zip(points, kl, mean, strict=True):
            ax.annotate(f"{knob}={v:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
            summary.append(f"| {v:g} | {method} | {a['mean']:.3f} ± {a['se']:.3f} | {a['kl']:.2f} ± {a['kl_se']:.2f} |")
    ax.set_xlabel("KL(π‖π_SFT), nats per continuation")
    ax.set_ylabel("mean oracle reward")
    ax.set_title(
        f"Reward–KL frontier, tier {cells[0].tier if cells else '?'}, grid over {knob}\n"
        "mean over seeds, 95 % CI; faint: each seed",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png = out_dir / "reward_kl_frontier.png"
    fig.savefig(png, dpi=130)
    plt.close(fig)
    lines = header(f"Reward–KL frontier: {', '.join(methods)} over {knob}", cfg, argv, wall, cells)
    lines += [
        f"![frontier]({png.name})",
        "",
        "Mean over seeds (SE over seeds):",
        "",
        f"| {knob} | method | reward ± SE | KL ± SE |",
        "|---|---|---|---|",
        *summary,
        *matched_kl_lines(curves, knob),
        *against_dpo_lines(curves, knob),
        "",
        "Every run:",
        "",
        f"| {knob} | method | seed | reward ± SE | KL ± SE |",
        "|---|---|---|---|---|",
    ]
    for c in sorted(cells, key=lambda c: (c.extra[knob], c.method, c.seed)):
        lines.append(
            f"| {c.extra[knob]:g} | {c.method} | {c.seed} | {c.mean:.3f} ± {c.se:.3f} | {c.kl:.2f} ± {c.kl_se:.2f} |"
        )
    return "\n".join(lines) + "\n"


def robustness_report(cfg: PipelineConfig, argv: list[str], wall: float, cells: list[Cell]) -> str:
    """robustness.md: MADPO per margin-noise level against DPO (which reads no margins)."""
    lines = header("Robustness: reward-model margin noise (MADPO) vs DPO", cfg, argv, wall, cells)
    lines += [
        "MADPO's training margins are perturbed before weighting: m' = s·(m + ε), ε ~ N(0, σ²), s = −1 on a seeded "
        "fraction of pairs (`PreferenceDataModule(margin_noise_std, margin_flip_fraction)`). DPO reads no margins, "
        "so its row is the same at every level.",
        "",
        "| σ | flipped | MADPO reward ± SE | MADPO KL | DPO reward ± SE | Δ MADPO − DPO |",
        "|---|---|---|---|---|---|",
    ]
    dpo = [c for c in cells if c.method == "dpo"]
    dpo_agg = aggregate(dpo) if dpo else None
    levels = sorted({(c.extra["noise_std"], c.extra["flip_fraction"]) for c in cells if c.method != "dpo"})
    for std, flip in levels:
        group = [
            c for c in cells if c.method != "dpo" and (c.extra["noise_std"], c.extra["flip_fraction"]) == (std, flip)
        ]
        a = aggregate(group)
        dpo_txt = f"{dpo_agg['mean']:.3f} ± {dpo_agg['se']:.3f}" if dpo_agg else "–"
        delta = f"{a['mean'] - dpo_agg['mean']:+.3f}" if dpo_agg else "–"
        lines.append(
            f"| {std:g} | {flip:.0%} | {a['mean']:.3f} ± {a['se']:.3f} | {a['kl']:.1f} | {dpo_txt} | {delta} |"
        )
    return "\n".join(lines) + "\n"
