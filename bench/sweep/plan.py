"""Which cells an invocation of bench/reproduce.py wants: the table (methods × tiers × seeds, plus the noise-matched
cDPO / rDPO cells), the reward–KL frontier and the robustness sweep, each cell with its store spec.

Every method gets the config's `policy` section; only method, tier and seed change (and β or lr on the frontier,
margin noise in the robustness sweep, ε for the noise-matched cells)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from cellstore import cell_spec, spec_key

from madpo.losses import with_options
from madpo.pipeline.config import PipelineConfig, PolicyConfig, preset_loss
from madpo.pipeline.stages import policy_label

from .cells import madpo_loss

DEFAULT_METHODS = (
    "dpo",
    "ipo",
    "beta_dpo",
    "madpo",
    "madpo_amp_only",
    "madpo_reg_only",
    "madpo_no_downweight",
    "madpo_no_amplify",
    "odpo",
    "margin_target",
    "cdpo",
    "rdpo",
    "hinge",
)
BASELINES = ("dpo", "ipo", "beta_dpo", "beta_dpo_madpo_repo")
MARGIN_COMPETITORS = ("odpo", "margin_target")
"""Read the same reward-model margin as MADPO, another way (an offset, a target)."""
NOISE_COMPETITORS = ("cdpo", "rdpo")
"""Read no margin: they assume a label-flip rate ε instead."""
NOISE_MATCHED = {"cdpo": "cdpo_oracle_eps", "rdpo": "rdpo_oracle_eps"}
"""`--noise-matched`: cDPO / rDPO with ε = the tier's measured label-flip rate (the oracle's, no user has it)."""
RDPO_MAX_EPS = 0.49
"""rDPO divides by 1 − 2ε: ε = 0.5 is undefined, so a measured rate at or above it is capped here."""
# docs/method.md eq. (17): c(|m|) ≥ 1 for |m| < τ, so amp-only (c clamped ≥ 1) is the paper's MADPO and reg-only
# (c clamped ≤ 1, hence w = 1) is DPO on every pair with |m| < τ; they differ only where a margin reaches ±τ.
SAME_BELOW_TAU = {"madpo_amp_only": "madpo", "madpo_reg_only": "dpo"}
TAU_GAP = 0.5  # margins are scored here in float32, in the runs at the trainer's precision: stay this far inside τ


def items(text: str, cast: Any = str) -> list:
    """A comma-separated option as a list."""
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


@dataclasses.dataclass(frozen=True)
class Planned:
    """One cell of a report: the policy it trains, the name and labels it is reported under, its store spec (None
    while it depends on a record not yet stored: a noise-matched ε before the tier's pairs are measured)."""

    report: str
    policy: PolicyConfig
    method: str
    extra: dict
    spec: dict | None

    @property
    def key(self) -> str:
        return spec_key(self.spec) if self.spec is not None else "(after the tier's context record)"

    @property
    def label(self) -> str:
        """What --pending prints: the reported name, and the run it is when that differs."""
        run = policy_label(self.policy)
        shown = f"{self.report}: {self.method} / {self.policy.tier} / seed {self.policy.seed}"
        return shown if run == f"policy-{self.method}-{self.policy.tier}-s{self.policy.seed}" else f"{shown} ({run})"


def rm_methods(methods: list[str]) -> list[str]:
    """The methods whose preset reads the reward model's margin."""
    return [m for m in methods if preset_loss(m).data_requirements().rm_margin]


def plan(
    opts: argparse.Namespace,
    cfg: PipelineConfig,
    pairs_ctx: dict[str, dict | None] | None = None,
    reward_ctx: dict[str, dict | None] | None = None,
) -> list[Planned]:
    """Every cell of this invocation, in report order. An amp-only / reg-only cell on a tier whose margins all stay
    inside ±(τ − TAU_GAP) (the tier's reward record) is the MADPO / DPO run of the same seed (identical weights); a
    noise-matched cell reads ε from the tier's pairs record."""
    methods, tiers, seeds = items(opts.methods), items(opts.tiers), items(opts.seeds, int)
    pairs_ctx, reward_ctx = pairs_ctx or {}, reward_ctx or {}
    fields = {f.name for f in dataclasses.fields(PolicyConfig)}
    tau = madpo_loss(cfg.policy).tau

    def policy(**changes: Any) -> PolicyConfig:
        """cfg.policy with some fields changed; other names (β) are options of its loss."""
        options = {k: changes.pop(k) for k in list(changes) if k not in fields}
        loss = with_options(cfg.policy.loss, **options) if options else cfg.policy.loss
        return dataclasses.replace(cfg.policy, loss=loss, **changes)

    def cell(report: str, p: PolicyConfig, method: str | None = None, **extra: Any) -> Planned:
        return Planned(report, p, method or p.name, extra, cell_spec(cfg, p))

    def table_cell(m: str, t: str, s: int) -> Planned:
        ctx = reward_ctx.get(t)
        if m in SAME_BELOW_TAU and not opts.train_identical and ctx and ctx["max_abs_margin"] < tau - TAU_GAP:
            same = SAME_BELOW_TAU[m]
            return cell("table", policy(method=same, tier=t, seed=s), m, identical_to=same, **_max(ctx))
        return cell("table", policy(method=m, tier=t, seed=s))

    def matched_cell(m: str, t: str, s: int) -> Planned:
        name, ctx = NOISE_MATCHED[m], pairs_ctx.get(t)
        # method=None: the preset would reset label_smoothing to its own ε; the loss carries the config's β
        base = preset_loss(m, cfg.policy.loss)
        if ctx is None or ctx.get("frac_disagree") is None:
            return Planned("table", policy(method=m, tier=t, seed=s), name, {"oracle_eps": True}, None)
        eps = float(ctx["frac_disagree"])
        used = min(eps, RDPO_MAX_EPS) if m == "rdpo" else min(eps, 0.5)
        p = dataclasses.replace(cfg.policy, method=None, loss=with_options(base, label_smoothing=used), tier=t, seed=s)
        return cell("table", p, name, oracle_eps=True, frac_disagree=eps, label_smoothing=used)

    out: list[Planned] = []
    if not opts.no_table:
        for t in tiers:
            out += [table_cell(m, t, s) for m in methods for s in seeds]
            if opts.noise_matched:
                out += [matched_cell(m, t, s) for m in NOISE_MATCHED for s in seeds]
    if opts.frontier:
        knob = opts.frontier_knob
        grids = frontier_grids(opts)
        # value-major, so that a partial run (--max-cells, --jobs) covers every method at its first values
        out += [
            cell("frontier", policy(method=m, tier=opts.frontier_tier, seed=s, **{knob: grid[i]}), **{knob: grid[i]})
            for i in range(max(map(len, grids.values())))
            for m, grid in grids.items()
            if i < len(grid)
            for s in seeds
        ]
    if opts.robustness:
        levels = [(n, 0.0) for n in items(opts.noise_std, float)]
        levels += [(0.0, f) for f in items(opts.flip_fraction, float) if f > 0]
        out += [cell("robustness", policy(method="dpo", tier=opts.robustness_tier, seed=s)) for s in seeds]
        out += [
            cell(
                "robustness",
                policy(method="madpo", tier=opts.robustness_tier, seed=s, margin_noise_std=n, margin_flip_fraction=f),
                noise_std=n,
                flip_fraction=f,
            )
            for n, f in levels
            for s in seeds
        ]
    return out


def frontier_grids(opts: argparse.Namespace) -> dict[str, list[float]]:
    """Each frontier method's knob values: `--frontier-grid`, or its own from `--frontier-method-grid METHOD=V,...`
    (a method whose KL range lies elsewhere, as DPO's below MADPO's at the same β, needs other values to overlap)."""
    grids = {m: items(opts.frontier_grid, float) for m in items(getattr(opts, "frontier_methods", "dpo,madpo"))}
    for spec in getattr(opts, "frontier_method_grid", None) or []:
        method, sep, values = spec.partition("=")
        if not sep or method not in grids or not values:
            raise SystemExit(
                f"--frontier-method-grid {spec!r}: expected METHOD=V1,V2,... with METHOD one of the frontier methods "
                f"{list(grids)}"
            )
        grids[method] = items(values, float)
    return grids


def _max(ctx: dict) -> dict:
    return {"max_abs_margin": ctx["max_abs_margin"]}


def unique_runs(planned: list[Planned]) -> list[Planned]:
    """One entry per stored spec, in plan order (a frontier, robustness or shortcut cell can be a table cell's run:
    it is one stage and one stored cell); the cells still waiting for a record are left out."""
    seen: dict[str, Planned] = {}
    for p in planned:
        if p.spec is not None:
            seen.setdefault(p.key, p)
    return list(seen.values())


def context_tiers(opts: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(tiers whose pairs record the table needs, tiers whose reward record it needs: where a method reads the
    reward model's margin, for its accuracy, margins and the amp-only / reg-only shortcut)."""
    if opts.no_table:
        return [], []
    tiers = items(opts.tiers)
    return tiers, (tiers if rm_methods(items(opts.methods)) else [])


__all__ = [
    "BASELINES",
    "DEFAULT_METHODS",
    "MARGIN_COMPETITORS",
    "NOISE_COMPETITORS",
    "NOISE_MATCHED",
    "Planned",
    "SAME_BELOW_TAU",
    "TAU_GAP",
    "context_tiers",
    "items",
    "plan",
    "unique_runs",
]
