"""The report section "Who uses the margin best": per tier, MADPO against the methods that read the same
reward-model margin another way (ODPO's offset, a margin target) and against the ones that read no margin but
assume a label-flip rate (cDPO, rDPO, at their preset ε and at the oracle's ε), each against DPO paired by seed.

The question the paper leaves open is whether the gain comes from MADPO's use of the margin or from using a margin
at all (or from handling label noise at all); a row here is only a verdict when its interval excludes 0, so the
section says which differences are within noise."""

from __future__ import annotations

from .cells import Cell, aggregate, paired_difference
from .plan import MARGIN_COMPETITORS, NOISE_COMPETITORS, NOISE_MATCHED

GROUPS = (
    ("the same reward-model margin, used another way", ("madpo", *MARGIN_COMPETITORS)),
    (
        "no reward model: a fixed or the oracle's label-flip rate ε",
        ("madpo", *NOISE_COMPETITORS, *NOISE_MATCHED.values()),
    ),
)


def _ci(d: dict | None, spec: str = "+.3f") -> str:
    if d is None:
        return "–"
    return f"{d['mean']:{spec}} ± {d['se']:.3f} [{d['lo']:{spec}}, {d['hi']:{spec}}]"


def _noise(d: dict | None) -> str:
    if d is None:
        return "–"
    return "within noise" if d["lo"] <= 0 <= d["hi"] else "resolved"


def margin_best_rows(cells: list[Cell], tiers: list[str]) -> list[dict]:
    """One row per (tier, group, method) with stored cells: aggregate, Δ vs DPO and MADPO − it, paired by seed."""
    rows = []
    for t in tiers:
        by = {m: [c for c in cells if c.tier == t and c.method == m] for m in {c.method for c in cells}}
        dpo, mad = by.get("dpo", []), by.get("madpo", [])
        for group, methods in GROUPS:
            for m in methods:
                mine = by.get(m, [])
                if not mine or (m == "madpo" and not any(by.get(o) for o in methods[1:])):
                    continue
                rows.append(
                    {
                        "tier": t,
                        "group": group,
                        "method": m,
                        **{k: v for k, v in aggregate(mine).items()},
                        "d_dpo": paired_difference(mine, dpo) if dpo else None,
                        "d_dpo_kl": paired_difference(mine, dpo, "kl") if dpo else None,
                        "madpo_minus": paired_difference(mad, mine) if mad and m != "madpo" else None,
                    }
                )
    return rows


def margin_best_section(cells: list[Cell], tiers: list[str]) -> list[str]:
    """The markdown lines of the section (none when no competitor cell is stored)."""
    rows = margin_best_rows(cells, tiers)
    if not rows:
        return []
    lines = [
        "",
        "## Who uses the margin best",
        "",
        "MADPO against ODPO (the margin as an offset, α = 1) and margin_target (the margin as a target, η = 1), which "
        "read the same reward-model margin, and against cDPO / rDPO (ε = 0.1, and ε = the tier's measured flip rate "
        "where `--noise-matched` ran), which read none. Δ = method − DPO and MADPO − method, paired by seed: mean ± "
        "SE [95 % CI] (Student t over seeds; one seed: the run's within-run interval).",
        "",
        "All at the same hyperparameters (the config's policy section, β included), **not at matched KL**: a method "
        "that moves further from the SFT model can score higher for that reason alone, so read the KL columns. A "
        "KL-matched comparison needs the frontier's β grid (`--frontier`) for each method.",
    ]
    for t in dict.fromkeys(r["tier"] for r in rows):
        for group, _ in GROUPS:
            mine = [r for r in rows if r["tier"] == t and r["group"] == group]
            if not mine:
                continue
            lines += [
                "",
                f"**Tier {t}: {group}**",
                "",
                "| method | reward ± SE | KL ± SE | Δ vs DPO | | Δ KL vs DPO | MADPO − method | |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in mine:
                lines.append(
                    f"| {r['method']} | {r['mean']:.3f} ± {r['se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} | "
                    f"{_ci(r['d_dpo'])} | {_noise(r['d_dpo'])} | {_ci(r['d_dpo_kl'], '+.2f')} | "
                    f"{_ci(r['madpo_minus'])} | {_noise(r['madpo_minus'])} |"
                )
    resolved = [
        f"{r['tier']}: madpo − {r['method']} {r['madpo_minus']['mean']:+.3f}"
        for r in rows
        if r["madpo_minus"] and _noise(r["madpo_minus"]) == "resolved"
    ]
    lines += [
        "",
        "Differences whose 95 % CI excludes 0 (MADPO − competitor): "
        + ("; ".join(resolved) if resolved else "none")
        + ". Every other difference above is within noise at this number of seeds.",
    ]
    return lines
