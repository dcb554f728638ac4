"""Stage 5, `sft` <- reviews, base_model: SFT on positive reviews (completion-only NLL after the first prompt
tokens)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from madpo.pipeline.config import SftConfig
from madpo.pipeline.stages import training
from madpo.pipeline.stages.base import (
    Context,
    StageInputs,
    StageOutput,
    StageResult,
    TrainingSettings,
    check_prompt_lengths,
    run_stage,
)
from madpo.pipeline.stages.reviews import load_reviews, load_slices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SftInputs(StageInputs):
    """The SFT section, the prompt length (`data.prompt_tokens`), the trainer settings, reviews and base model."""

    stage = "sft"
    cfg: SftConfig
    prompt_tokens: int
    training: TrainingSettings
    reviews: StageResult
    base: StageResult


def train_sft(inputs: SftInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.losses import SFTLoss
    from madpo.modeling import load_tokenizer
    from madpo.modules.policy import PolicyLightningModule
    from madpo.pipeline.generate import split_review

    cfg, prompt_tokens = inputs.cfg, inputs.prompt_tokens
    training.seed_everything(cfg.seed)
    base_path = inputs.base.output("model")
    tok = load_tokenizer(base_path)
    data, slices = load_reviews(inputs.reviews), load_slices(inputs.reviews)
    rows, n_short = [], 0
    for text in slices.texts(data, "sft"):
        prompt, completion = split_review(text, tok, prompt_tokens, 2 * cfg.max_length)
        if not completion.strip():
            n_short += 1
            continue
        rows.append({"prompt": prompt, "completion": completion})
    if n_short:
        log.warning("sft: skipped %d review(s) no longer than the %d prompt tokens", n_short, prompt_tokens)
    n_val = min(cfg.n_val, len(rows) // 2)
    train, val = rows[: len(rows) - n_val], rows[len(rows) - n_val :]
    if not train:
        raise ValueError("no SFT reviews to train on (data.n_sft is too small)")
    max_prompt = prompt_tokens + 8
    check_prompt_lengths([r["prompt"] for r in train + val], tok, max_prompt, "sft review")
    module = PolicyLightningModule(
        base_path,
        loss=SFTLoss(),
        optimizer=training.optimizer_options(inputs.training, cfg.lr, cfg.warmup_ratio),
        lora=cfg.lora,
        export=cfg.lora is None,
        export_dir=str(path / "model"),
    )
    result, _ = training.fit(
        ctx,
        inputs.training,
        path,
        module,
        training.dataset(train, ("prompt", "completion")),
        training.dataset(val, ("prompt", "completion")) if val else None,
        tokenizer=base_path,
        max_length=cfg.max_length,
        max_prompt_length=max_prompt,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
    )
    if cfg.lora is not None:  # the reference and the policy's starting point: base + SFT adapter, merged
        module.export(str(path / "model"), merge_adapter=True)
    return StageOutput(
        {"model": "model"}, {"n_train": len(train), "n_val": len(val), "n_skipped_short": n_short, **result}
    )


def stage_sft(ctx: Context, inputs: SftInputs) -> StageResult:
    """SFT on the positive reviews: prompt = the first `prompt_tokens` tokens, completion = the rest (cut to
    `max_length`), token-mean NLL on the completion only. The last `n_val` reviews validate."""
    return run_stage(ctx, inputs, train_sft)
