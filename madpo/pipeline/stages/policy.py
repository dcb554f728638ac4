"""Stage 8, `policy` <- sft, pairs, reward (MADPO methods): the preference-optimised policy (docs/method.md §IMDB
protocol, "Reward model and policy")."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from madpo.losses import DEFAULT_TAU, PreferenceLoss
from madpo.modules.base import LoraOptions
from madpo.pipeline.config import PolicyConfig
from madpo.pipeline.stages import training
from madpo.pipeline.stages.base import (
    Context,
    StageError,
    StageInputs,
    StageOutput,
    StageResult,
    TrainingSettings,
    run_stage,
    say,
)
from madpo.pipeline.stages.pairs import load_pairs, pair_data
from madpo.pipeline.stages.reward import margin_stats, score_rm_margins, with_rm_margin


def policy_label(cfg: PolicyConfig) -> str:
    """The policy stage's directory prefix: method, tier, seed, and what a MADPO run's margins are when they are not
    the reward model's as scored (`-oracle-sd1`, `-random`; `-noise..-flip..` for a robustness perturbation)."""
    label = f"policy-{cfg.name}-{cfg.tier}-s{cfg.seed}"
    if cfg.uses_margins and cfg.margin_source == "oracle":
        label += f"-oracle-sd{cfg.margin_source_noise_std:g}"
    elif cfg.uses_margins and cfg.margin_source != "reward_model":
        label += f"-{cfg.margin_source}"
    if cfg.margin_noise_std or cfg.margin_flip_fraction:
        label += f"-noise{cfg.margin_noise_std:g}-flip{cfg.margin_flip_fraction:g}"
    return label


@dataclass(frozen=True)
class Margins:
    """What a loss that reads reward-model margins adds to the policy's inputs: the tier's reward model and the
    robustness perturbation of its training margins (docs/method.md eq. (37)). `reward` is None only in
    `SyntheticMargins`."""

    reward: StageResult | None
    noise_std: float
    flip_fraction: float


@dataclass(frozen=True)
class SyntheticMargins(Margins):
    """Margins drawn from the pairs' oracle gaps (`madpo.pipeline.margins.synthetic_margins`) instead of a reward
    model's: no reward model (`reward` None), and the source and its noise σ in the key. A subclass rather than two
    more fields of `Margins`, so that the key of every reward-model run, and its cached stage, stays as it was."""

    source: str
    source_noise_std: float


@dataclass(frozen=True)
class PolicyInputs(StageInputs):
    """What the policy stage reads: the loss (its class and own options; `policy.method` is a preset that chose
    them), the training options of `PolicyConfig`, the pair lengths, the trainer settings, the SFT model (start and
    reference) and the pairs, and, for a loss that reads margins only, where they come from (the reward model or a
    synthetic source) and the perturbation."""

    stage = "policy"
    loss: PreferenceLoss
    tier: str
    seed: int
    lr: float
    batch_size: int
    accumulate_grad_batches: int
    epochs: int
    max_steps: int | None
    warmup_ratio: float
    schedule: str
    n_val: int | None
    lora: LoraOptions | None
    max_prompt_length: int
    max_length: int
    training: TrainingSettings
    sft: StageResult
    pairs: StageResult
    margins: Margins | None

    @classmethod
    def of(
        cls,
        cfg: PolicyConfig,
        lengths: tuple[int, int],
        settings: TrainingSettings,
        sft: StageResult,
        pairs: StageResult,
        reward: StageResult | None,
    ) -> PolicyInputs:
        margins: Margins | None = None
        if cfg.uses_margins and cfg.margin_source != "reward_model":
            margins = SyntheticMargins(
                None, cfg.margin_noise_std, cfg.margin_flip_fraction, cfg.margin_source, cfg.margin_source_noise_std
            )
        elif cfg.uses_margins:
            if reward is None:
                raise StageError(f"stage policy: method {cfg.name} needs the tier's reward model")
            margins = Margins(reward, cfg.margin_noise_std, cfg.margin_flip_fraction)
        return cls(
            # a fresh copy: a stateful loss (β-DPO's EMAs) starts from zero, and the config's object stays apart
            loss=copy.deepcopy(cfg.loss),
            tier=cfg.tier,
            seed=cfg.seed,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            accumulate_grad_batches=cfg.accumulate_grad_batches,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            warmup_ratio=cfg.warmup_ratio,
            schedule=cfg.schedule,
            n_val=cfg.n_val,
            lora=copy.deepcopy(cfg.lora),
            max_prompt_length=lengths[0],
            max_length=lengths[1],
            training=settings,
            sft=sft,
            pairs=pairs,
            margins=margins,
        )

    @property
    def lengths(self) -> tuple[int, int]:
        return self.max_prompt_length, self.max_length


def train_policy(inputs: PolicyInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.modeling import load_tokenizer
    from madpo.modules.policy import PolicyLightningModule
    from madpo.pipeline.margins import perturb_margins
    from madpo.pipeline.rm_quality import rm_quality

    training.seed_everything(inputs.seed)
    sft_path = inputs.sft.output("model")
    tok = load_tokenizer(sft_path)
    train, val, train_rows, n_val = pair_data(inputs.pairs, inputs.tier, inputs.n_val, tok, inputs.max_prompt_length)
    n_train = len(train_rows)
    module = PolicyLightningModule(
        sft_path,
        loss=copy.deepcopy(inputs.loss),  # a fresh copy: a stateful loss (β-DPO's EMAs) starts from zero
        optimizer=training.optimizer_options(inputs.training, inputs.lr, inputs.warmup_ratio, inputs.schedule),
        lora=inputs.lora,
        export=inputs.lora is None,
        export_dir=str(path / "model"),
    )
    margin_data: dict[str, dict] = {}
    margins = inputs.margins
    if margins is not None:
        # scored here rather than by the DataModule, so that a robustness run perturbs the training margins
        # before the DataModule reads them; the validation margins stay clean
        splits = {"train": train, **({"val": val} if val is not None else {})}
        if isinstance(margins, SyntheticMargins):
            val_rows = load_pairs(inputs.pairs, inputs.tier, "eval")[:n_val]
            scored, scoring = _synthetic_split_margins(
                margins, inputs, tok, splits, {"train": train_rows, "val": val_rows}
            )
        else:
            assert margins.reward is not None  # PolicyInputs.of refuses a reward-model source without one
            scored, scoring = score_rm_margins(ctx, margins.reward, tok, splits, inputs.lengths, under=inputs.training)
        margin_data = {split: {"rm_margin": split_stats} for split, split_stats in scoring.items()}
        rm_margin = scored["train"]["rm_margin"]
        if margins.noise_std or margins.flip_fraction:
            rm_margin, margin_data["train"]["margin_perturbation"] = perturb_margins(
                rm_margin, noise_std=margins.noise_std, flip_fraction=margins.flip_fraction, seed=inputs.seed
            )
            say(f"policy: training rm_margin perturbed: {margin_data['train']['margin_perturbation']}")
        train = with_rm_margin(train, scored["train"]["index"], rm_margin)
        if val is not None:
            val = with_rm_margin(val, scored["val"]["index"], scored["val"]["rm_margin"])
    result, dm = training.fit(
        ctx,
        inputs.training,
        path,
        module,
        train,
        val,
        tokenizer=sft_path,
        max_length=inputs.max_length,
        max_prompt_length=inputs.max_prompt_length,
        batch_size=inputs.batch_size,
        seed=inputs.seed,
        epochs=inputs.epochs,
        max_steps=inputs.max_steps,
        accumulate_grad_batches=inputs.accumulate_grad_batches,
    )
    if inputs.lora is not None:
        module.export(str(path / "model"), merge_adapter=True)
    stats = {"n_train": n_train, "n_val": n_val, **result}
    for split, extra in margin_data.items():  # beside the DataModule's own counts, where it put them before
        stats["data"].setdefault(split, {}).update(extra)
    ds = dm.train_dataset
    if margins is not None and ds is not None and "rm_margin" in ds.column_names:
        stats["margins"] = margin_stats(
            ds["rm_margin"], ds["index"], train_rows, getattr(inputs.loss, "tau", DEFAULT_TAU)
        )
        source = margins.source if isinstance(margins, SyntheticMargins) else "reward-model"
        say(f"policy: {source} margins on the training pairs: {stats['margins']}")
        # the margins the loss read, against the label model (BT excess over the Bayes loss, oracle agreement):
        # the x-axis of the reward-quality curve (bench/rm_quality_curve.py)
        stats["margin_quality"] = rm_quality(ds["rm_margin"], _oracle_gaps(train_rows, ds["index"]))
        say(f"policy: margin quality on the training pairs: {stats['margin_quality']}")
    return StageOutput({"model": "model"}, stats)


def _oracle_gaps(rows: Sequence[dict], index: Sequence[int]) -> np.ndarray:
    """g = oracle_chosen − oracle_rejected of `rows[i]` for each i in `index` (the tokenized rows' `index`)."""
    return np.asarray([rows[i]["oracle_chosen"] - rows[i]["oracle_rejected"] for i in index], dtype=np.float64)


def _synthetic_split_margins(
    margins: SyntheticMargins, inputs: PolicyInputs, tok: Any, splits: dict[str, Any], rows: dict[str, list[dict]]
) -> tuple[dict[str, dict], dict[str, dict]]:
    """What `score_rm_margins` returns (per split: the tokenized rows' `index` and their `rm_margin`; the stats),
    with the margins drawn by `synthetic_margins` from each kept pair's oracle gap instead of scored. Tokenized as
    the DataModule tokenizes, so that the pairs drawn for are the pairs that train, and `random`'s scale is the sd of
    the training gaps on validation too."""
    from madpo.data.formats import load_in_memory
    from madpo.data.tokenize import tokenize_dataset
    from madpo.pipeline.margins import synthetic_margins

    scored: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    scale = None
    for stream, split in enumerate(("train", "val")):
        if split not in splits:
            continue
        ds, _ = tokenize_dataset(
            load_in_memory(splits[split]),
            tok,
            max_length=inputs.max_length,
            max_prompt_length=inputs.max_prompt_length,
            split=split,
        )
        index = list(ds["index"])
        gaps = _oracle_gaps(rows[split], index)
        m, stats[split] = synthetic_margins(
            gaps,
            source=margins.source,
            noise_std=margins.source_noise_std,
            seed=inputs.seed,
            scale=scale,
            stream=stream,
        )
        scale = stats[split].get("scale", scale)  # random: the training gaps' sd on every split
        scored[split] = {"index": index, "rm_margin": m.tolist()}
    return scored, stats


def stage_policy(ctx: Context, inputs: PolicyInputs, label: str) -> StageResult:
    """The policy: `PolicyLightningModule(loss)` from the SFT model (also the reference, its log-probs
    precomputed by the DataModule), on the tier's training pairs; MADPO methods read the tier's reward-model
    margins (docs/method.md eq. (3)), or synthetic ones drawn from the oracle gaps (`policy.margin_source`),
    optionally perturbed for robustness runs (eq. (37)). Same hyperparameters
    for every method. `label` names the directory (`policy_label`); the key does not hold it."""
    return run_stage(ctx, inputs, train_policy, label=label)
