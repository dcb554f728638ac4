"""Stage 7, `reward` <- base_model, pairs (per tier): a Bradley–Terry reward model; and the scoring of its margins
m = r(chosen) − r(rejected) on a tier's pairs, which the MADPO policy stage reads."""

from __future__ import annotations

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
from madpo.pipeline.stages.pairs import pair_data


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

    @property
    def label(self) -> str:
        return f"reward-{self.tier}"


def train_reward_model(inputs: RewardInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.modeling import load_tokenizer
    from madpo.modules.reward import RewardLightningModule

    cfg, tier = inputs.cfg, inputs.tier
    training.seed_everything(cfg.seed)
    base_path = inputs.base.output("model")
    tok = load_tokenizer(base_path)
    train, val, train_rows, n_val = pair_data(inputs.pairs, tier, cfg.n_val, tok, inputs.max_prompt_length)
    n_train = len(train_rows)
    module = RewardLightningModule(
        base_path,
        optimizer=training.optimizer_options(inputs.training, cfg.lr, cfg.warmup_ratio),
        lora=cfg.lora,
        export_dir=str(path / "model"),
    )
    result, _ = training.fit(
        ctx,
        inputs.training,
        path,
        module,
        train,
        val,
        tokenizer=base_path,
        max_length=inputs.max_length,
        max_prompt_length=inputs.max_prompt_length,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        val_every_n_steps=cfg.val_every_n_steps,
        early_stopping_patience=cfg.early_stopping_patience,
    )
    acc = result["metrics"].get("val/accuracy")
    if acc is not None:
        say(f"reward model ({tier}): validation accuracy {acc:.3f} on {n_val} eval pairs (noisy labels)")
    return StageOutput({"model": "model"}, {"n_train": n_train, "n_val": n_val, **result})


def stage_reward(ctx: Context, inputs: RewardInputs) -> StageResult:
    """A Bradley–Terry reward model on the tier's training pairs, initialised from the base LM (the reward model
    starts from the base model, docs/method.md §IMDB protocol), validated on the first `n_val` eval pairs."""
    return run_stage(ctx, inputs, train_reward_model, label=inputs.label)


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
    the policy reads), or None: on the CPU in float32."""
    from madpo.data.collate import PreferenceCollator
    from madpo.data.formats import load_in_memory
    from madpo.data.tokenize import tokenize_dataset
    from madpo.modeling import state_fingerprint
    from madpo.scoring import attach_rm_margins, open_reward_model, scoring_context

    max_prompt_length, max_length = lengths
    if under is not None:
        device, forward_context, precision = training.trainer_scoring_context(under)
    else:
        device, forward_context, precision = scoring_context(None)
    path = reward.output("model")
    tokenized: dict[str, Any] = {}
    stats: dict[str, dict] = {}
    with open_reward_model(path, tok, device=device) as reward_model:
        model_fingerprint = state_fingerprint(reward_model)
        for split, rows in splits.items():
            ds, _ = tokenize_dataset(
                load_in_memory(rows), tok, max_length=max_length, max_prompt_length=max_prompt_length, split=split
            )
            stats[split] = {"source": f"reward_model={path}"}
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
