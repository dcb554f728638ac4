"""Cells (one trained and evaluated policy) and the other records the sweep's reports read, all kept in one
`CellStore`.

A cell takes minutes and a sweep hours, longer than a session, and the stage cache (the pipeline's output dir) stays
behind on the machine that built it. So every finished cell is stored as a small committed file, and so is every
other number the reports quote (the SFT model's reward, each tier's label noise and pair counts, its reward model's
accuracy and margins): when all of them are stored, the reports are rewritten on a fresh clone without building a
single pipeline stage. `Records` is the one door to both: a record is read from the store when it is there and
computed (building the pipeline on first need) and stored when it is not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from cellstore import CellStore, cell_spec

from madpo.pipeline.config import PipelineConfig, PolicyConfig
from madpo.pipeline.stages import Pipeline, load_pairs, say

from .builds import InputBuild, array_digest, build_of, shared_build


@dataclasses.dataclass
class Cell:
    """One evaluated policy."""

    method: str
    tier: str
    seed: int
    mean: float
    se: float
    sd: float
    kl: float
    kl_se: float
    policy_seconds: float
    eval_seconds: float
    cached: bool
    policy_stage: str
    eval_stage: str
    margins: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    inputs: dict | None = None
    """The `InputBuild` it was trained on (bench/sweep/builds.py); None for a cell stored before builds were."""
    train_metrics: dict | None = None
    """The policy run's last logged metrics (training ones as last-epoch means: beta-DPO's batch β and kept share,
    MADPO's weight range, the implicit rewards); None for a cell stored before they were kept."""


def run_cell(pipe: Pipeline, policy: PolicyConfig, inputs: InputBuild | None = None, **extra: Any) -> Cell:
    """Train (or find cached) and evaluate one policy. With extra `as_method`, the cell is reported under that name
    (an amp-only cell that is MADPO's run, a cDPO run with the oracle's ε)."""
    policy_stage = pipe.policy(policy)
    evaluation = pipe.evaluate_model(policy_stage)
    r, kl = evaluation.stats["reward"], evaluation.stats["kl"]
    return Cell(
        method=extra.get("as_method", policy.name),
        tier=policy.tier,
        seed=policy.seed,
        mean=r["mean"],
        se=r["se"],
        sd=r["sd"],
        kl=kl["mean"],
        kl_se=kl["se"],
        policy_seconds=policy_stage.seconds,
        eval_seconds=evaluation.seconds,
        cached=policy_stage.cached and evaluation.cached,
        policy_stage=policy_stage.path.name,
        eval_stage=evaluation.path.name,
        margins=policy_stage.stats.get("margins"),
        extra=extra,
        inputs=inputs.to_dict() if inputs is not None else None,
        train_metrics=run_metrics(policy_stage.stats.get("metrics", {})),
    )


def run_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A run's final metrics without the per-step duplicates: `train/x_epoch` is kept as `train/x` (the mean over
    the last epoch), `train/x_step` (one batch's value) is dropped."""
    kept = {k: v for k, v in metrics.items() if not k.endswith("_step") and f"{k}_epoch" not in metrics}
    return {k.removesuffix("_epoch"): v for k, v in sorted(kept.items())}


def aggregate(cells: list[Cell]) -> dict:
    """Mean over seeds; SE = SD over seeds / √n (n ≥ 2), else the single run's SE (SD/√n_prompts)."""
    means = np.array([c.mean for c in cells])
    kls = np.array([c.kl for c in cells])
    n = len(cells)
    if n >= 2:
        se, se_kind = float(means.std(ddof=1) / math.sqrt(n)), f"over {n} seeds"
        kl_se = float(kls.std(ddof=1) / math.sqrt(n))
    else:
        se, se_kind, kl_se = cells[0].se, "within run", cells[0].kl_se
    return {"mean": float(means.mean()), "se": se, "se_kind": se_kind, "kl": float(kls.mean()), "kl_se": kl_se, "n": n}


def paired_difference(a: list[Cell], b: list[Cell], field: str = "mean") -> dict | None:
    """a − b over the seeds both have, paired by seed within one input build: mean, SE and a 95 % CI (Student t over
    n ≥ 2 seeds, else the one run's 1.96·√(SE_a² + SE_b²), unpaired over prompts and so conservative). None when no
    seed is shared. Pairing by seed removes what the seeds share (data order, and the pairs and margins of their
    build), which an unpaired SE would count as noise."""
    from scipy import stats

    by_a, by_b = {(c.seed, build_of(c)): c for c in a}, {(c.seed, build_of(c)): c for c in b}
    seeds = sorted(set(by_a) & set(by_b))
    if not seeds:
        return None
    d = np.array([getattr(by_a[s], field) - getattr(by_b[s], field) for s in seeds])
    n = len(d)
    if n >= 2:
        se = float(d.std(ddof=1) / math.sqrt(n))
        half, kind = float(stats.t.ppf(0.975, n - 1) * se), f"t over {n} seeds"
    else:
        se_field = "se" if field == "mean" else f"{field}_se"
        se = math.hypot(getattr(by_a[seeds[0]], se_field), getattr(by_b[seeds[0]], se_field))
        half, kind = 1.96 * se, "within run"
    mean = float(d.mean())
    return {"mean": mean, "se": se, "lo": mean - half, "hi": mean + half, "n": n, "ci": kind}


def madpo_loss(policy: PolicyConfig) -> Any:
    """The MADPOLoss the sweep's MADPO cells train with: the config's loss options carried into the madpo preset."""
    return dataclasses.replace(policy, method="madpo").loss


def downweight_diagnostics(pipe: Pipeline, tier: str, policy: PolicyConfig, margins: np.ndarray) -> dict:
    """Label quality and composition of the pairs MADPO down-weights (m < 0) vs the rest, on the tier's training
    pairs, with the weights the run's loss gives them."""
    import torch

    rows = load_pairs(pipe.pairs(), tier, "train")
    w = madpo_loss(policy).weights(torch.tensor(margins)).numpy()
    neg = margins < 0
    right = np.array([r["oracle_chosen"] > r["oracle_rejected"] for r in rows])
    original = np.array([r["chosen_source"] == "original" for r in rows])

    def mean(x: np.ndarray, mask: np.ndarray) -> float:
        return float(x[mask].mean()) if mask.any() else float("nan")

    return {
        "frac": float(neg.mean()),
        "label_right_neg": mean(right, neg),
        "label_right_pos": mean(right, ~neg),
        "original_neg": mean(original, neg),
        "original_pos": mean(original, ~neg),
        "w_neg": mean(w, neg),
        "w_pos": mean(w, ~neg),
    }


# ------------------------------------------------------------------------------------------------------------------
# Records: cells and context, read from the store or computed once and stored
# ------------------------------------------------------------------------------------------------------------------

_NO_RM = PolicyConfig(method="dpo")
"""The policy the specs of records that read no policy are built with: fixed, so that a change of the policy
section (lr, β) keeps the SFT and pairs records, and DPO, so that the reward section is left out of their keys."""


def sft_spec(cfg: PipelineConfig, build: str | None = None) -> dict:
    """The SFT model's evaluation (the table's reference row); with `build`, that input build's own record."""
    return cell_spec(cfg, _NO_RM, record="sft_eval", **_build(build))


def pairs_spec(cfg: PipelineConfig, tier: str, build: str | None = None) -> dict:
    """A tier's pairs: label noise against the oracle and the pair counts."""
    return cell_spec(cfg, dataclasses.replace(_NO_RM, tier=tier), record="pairs_context", **_build(build))


def reward_spec(cfg: PipelineConfig, tier: str, build: str | None = None) -> dict:
    """A tier's reward model as MADPO reads it: validation accuracy, max |margin|, the down-weighting diagnostics
    (these use MADPO's weight with the config's options, so the spec holds the config's MADPO loss)."""
    policy = dataclasses.replace(cfg.policy, method="madpo", tier=tier, seed=0, margin_source="reward_model")
    policy = dataclasses.replace(policy, margin_source_noise_std=0.0, margin_noise_std=0.0, margin_flip_fraction=0.0)
    return cell_spec(cfg, policy, record="reward_context", **_build(build))


def _build(build: str | None) -> dict:
    """The spec's extra for a record of another input build than the first one stored (none for the first)."""
    return {"build": build} if build is not None else {}


class Records:
    """The store, and the pipeline behind it, built only when a record is missing. `built` tells whether it was:
    the check that a fully stored sweep touches no stage."""

    def __init__(self, cfg: PipelineConfig, store: CellStore, pipeline: Callable[[PipelineConfig], Any] | None = None):
        self.cfg, self.store = cfg, store
        self._make = pipeline
        self._pipe: Any = None

    @property
    def built(self) -> bool:
        return self._pipe is not None

    @property
    def pipe(self) -> Pipeline:
        """The pipeline, built on first use (with the trainer's thread count, as the pipeline CLI sets it)."""
        if self._pipe is None:
            if self.cfg.trainer.num_threads:
                import torch

                torch.set_num_threads(self.cfg.trainer.num_threads)
            self._pipe = (self._make or Pipeline)(self.cfg)
        return self._pipe

    def _get_or_make(self, spec: dict, name: str, make: Callable[[], dict], compute: bool) -> dict | None:
        record = self.store.get(spec)
        if record is not None:
            return record["result"]
        if not compute:
            return None
        say(f"bench: computing record {name}")
        return self.store.put(spec, make(), name=name)["result"]

    # the records of the current input build, computed from the pipeline; each one holds its `inputs`

    def _sft_record(self) -> dict:
        sft = self.pipe.evaluate_sft()
        inputs = InputBuild(self.shared_build()).to_dict()
        return {"reward": sft.stats["reward"], "kl": sft.stats.get("kl"), "seconds": sft.seconds, "inputs": inputs}

    def _pairs_record(self, tier: str) -> dict:
        t = self.pipe.pairs().stats["tiers"][tier]
        train, evaluation = t["train"], t["eval"]
        return {
            "tier": tier,
            "frac_disagree": train["frac_disagree"],
            "frac_disagree_eval": evaluation.get("frac_disagree"),
            "n_train": train["n"],
            "n_eval": evaluation["n"],
            "mean_abs_oracle_gap": train.get("mean_abs_oracle_gap"),
            "composition": train.get("composition"),
            "inputs": InputBuild(self.shared_build()).to_dict(),
        }

    def _reward_record(self, tier: str) -> dict:
        margins = self.pipe.train_margins(tier)
        return {
            "tier": tier,
            "rm_val_accuracy": self.pipe.reward(tier).stats["metrics"].get("val/accuracy"),
            "max_abs_margin": float(np.abs(margins).max()),
            "downweighted": downweight_diagnostics(self.pipe, tier, self.cfg.policy, margins),
            "inputs": self.inputs(tier, needs_reward_model=True).to_dict(),
        }

    def sft(self, compute: bool = True) -> dict | None:
        """{'reward': the SFT model's reward stats on the evaluation prompts, 'seconds', 'inputs'}."""
        return self._get_or_make(sft_spec(self.cfg), "sft_eval", self._sft_record, compute)

    def pairs_context(self, tier: str, compute: bool = True) -> dict | None:
        """{'frac_disagree', 'n_train', 'n_eval', 'mean_abs_oracle_gap', 'composition', 'inputs'} of the tier's
        pairs."""
        return self._get_or_make(
            pairs_spec(self.cfg, tier), f"pairs_context-{tier}", lambda: self._pairs_record(tier), compute
        )

    def reward_context(self, tier: str, compute: bool = True) -> dict | None:
        """{'rm_val_accuracy', 'max_abs_margin', 'downweighted', 'inputs'} of the tier's reward model (trains it if
        needed)."""
        return self._get_or_make(
            reward_spec(self.cfg, tier), f"reward_context-{tier}", lambda: self._reward_record(tier), compute
        )

    # input builds

    def shared_build(self) -> str:
        """The build hash of this machine's SFT model and pairs (bench/sweep/builds.py), computed once."""
        if not hasattr(self, "_shared_build"):
            self._shared_build = shared_build(self.pipe)
        return self._shared_build

    def inputs(self, tier: str, needs_reward_model: bool) -> InputBuild:
        """What a cell of `tier` reads here: the shared build and, for a method that reads margins, theirs."""
        margins = array_digest(self.pipe.train_margins(tier)) if needs_reward_model else None
        return InputBuild(self.shared_build(), margins)

    def record_build(self, pairs_tiers: list[str], reward_tiers: list[str], sft: bool) -> None:
        """Before cells run here: where the first stored record of a tier (or the SFT row) was computed on another
        input build than this machine's, compute and store this build's own, and print both, so that the report
        quotes the numbers of the inputs each cell was trained on."""
        build = self.shared_build()
        wanted: list[tuple[str, Callable[..., dict], tuple, Callable[[], dict]]] = []
        if sft:
            wanted.append(("sft_eval", sft_spec, (), self._sft_record))
        for t in pairs_tiers:
            wanted.append((f"pairs_context-{t}", pairs_spec, (t,), lambda t=t: self._pairs_record(t)))
        for t in reward_tiers:
            wanted.append((f"reward_context-{t}", reward_spec, (t,), lambda t=t: self._reward_record(t)))
        for name, spec_of, args, make in wanted:
            first = self.store.get(spec_of(self.cfg, *args))
            if first is None or build_of(first["result"]) == build:
                continue
            ours = self._get_or_make(spec_of(self.cfg, *args, build=build), name, make, True)
            assert ours is not None
            say(
                f"bench: input build {build} differs from the stored {name}'s ({build_of(first['result'])}): "
                f"{_compare(first['result'], ours)}"
            )

    def check_margins(self, tiers: set[str]) -> None:
        """Before margin-reading cells of `tiers` run here: refuse when this machine's margins differ from those its
        build's stored reward record was computed from. The SFT model and pairs can be rebuilt bit for bit while the
        reward model is not (its thread count is enough), and the new cells would then be reported beside another
        model's diagnostics and averaged with cells that read other margins."""
        build = self.shared_build()
        for t in sorted(tiers):
            first = self.store.get(reward_spec(self.cfg, t))
            record = first if first is None or build_of(first["result"]) == build else None
            record = record or self.store.get(reward_spec(self.cfg, t, build=build))
            stored = ((record or {}).get("result", {}).get("inputs") or {}).get("margins")
            here = self.inputs(t, needs_reward_model=True).margins
            if stored is not None and stored != here:
                raise SystemExit(
                    f"bench: the {t} reward model's margins here (digest {here}) differ from those of the stored "
                    f"reward record of build {build} ({stored}): its cells would not pair with the stored ones. "
                    f"Move runs/.../reward-{t}-* aside and retrain it as the stored one was (the thread count is "
                    "part of a build: see the README), or run these cells under another --cells-dir"
                )

    def context_builds(self, pairs_tiers: list[str], reward_tiers: list[str], sft: bool) -> dict[str, dict]:
        """Every stored build's records, from the store alone: {build: {'pairs': {tier: record}, 'reward': {tier:
        record}, 'sft': record}}, the first stored build first."""
        out: dict[str, dict] = {}
        kinds = [("sft", sft_spec, None)] if sft else []
        kinds += [("pairs", pairs_spec, t) for t in pairs_tiers] + [("reward", reward_spec, t) for t in reward_tiers]
        for kind, spec_of, tier in kinds:
            first = spec_of(self.cfg) if tier is None else spec_of(self.cfg, tier)
            for result in self.store.variants(first, "build"):
                entry = out.setdefault(build_of(result), {"pairs": {}, "reward": {}, "sft": None})
                if tier is None:
                    entry[kind] = result
                else:
                    entry[kind][tier] = result
        return out

    def cell(self, spec: dict) -> Cell | None:
        """The stored cell of `spec`, or None."""
        record = self.store.get(spec)
        return Cell(**record["result"]["cell"]) if record is not None else None

    def run(self, policy: PolicyConfig, spec: dict, name: str) -> Cell:
        """Train (or find in the stage cache) and evaluate one cell, and store it with the build it read."""
        inputs = self.inputs(policy.tier, policy.needs_reward_model)
        cell = run_cell(self.pipe, policy, inputs)
        self.store.put(spec, {"cell": dataclasses.asdict(cell)}, name=name)
        return cell


def _compare(first: dict, ours: dict) -> str:
    """The numbers two builds' records differ in, as 'field stored -> here'."""
    fields = ("frac_disagree", "n_train", "n_eval", "mean_abs_oracle_gap", "rm_val_accuracy", "max_abs_margin")
    changes = [f"{f} {first[f]:.6g} -> {ours[f]:.6g}" for f in fields if f in first and first[f] != ours.get(f)]
    if "reward" in first and first["reward"]["mean"] != ours["reward"]["mean"]:
        changes.append(f"SFT reward {first['reward']['mean']:.6g} -> {ours['reward']['mean']:.6g}")
    return "; ".join(changes) or "the same numbers"
