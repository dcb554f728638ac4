"""Stage 4, `base_model` <- reviews, tokenizer: a small Llama trained as a language model on the reviews
(`madpo.losses.SFTLoss()` on prompt="" / completion=review), or the pretrained model as given (a GGUF file converted
once into a transformers directory)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from madpo.pipeline.config import BaseModelConfig, resolve_model_location
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
from madpo.pipeline.stages.reviews import load_reviews, load_slices


@dataclass(frozen=True)
class PretrainedModelInputs(StageInputs):
    """A pretrained base model: the model as given, and the tokenizer stage's copy of its tokenizer."""

    stage = "base_model"
    name_or_path: str
    gguf_file: str | None
    tokenizer: StageResult


@dataclass(frozen=True)
class BaseModelInputs(StageInputs):
    """A base model trained here: its shape and LM-training options, the trainer settings, reviews and tokenizer."""

    stage = "base_model"
    cfg: BaseModelConfig
    training: TrainingSettings
    reviews: StageResult
    tokenizer: StageResult


def base_model_inputs(
    cfg: BaseModelConfig, settings: TrainingSettings, reviews: StageResult, tokenizer: StageResult
) -> PretrainedModelInputs | BaseModelInputs:
    if cfg.name_or_path is not None:
        return PretrainedModelInputs(cfg.name_or_path, cfg.gguf_file, tokenizer)
    return BaseModelInputs(cfg, settings, reviews, tokenizer)


def _lm_config(cfg: BaseModelConfig) -> dict:
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }


def convert_pretrained(inputs: PretrainedModelInputs, path: Path, ctx: Context) -> StageOutput:
    location = resolve_model_location(inputs.name_or_path)
    if not inputs.gguf_file:
        return StageOutput({"model": str(location)}, {"pretrained": inputs.name_or_path})
    import torch
    from transformers import AutoModelForCausalLM

    from madpo.modeling import load_tokenizer

    gguf = AutoModelForCausalLM.from_pretrained(location, gguf_file=inputs.gguf_file, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model ("not serializable"): move its dequantised weights into a
    # plain model of the same config and save that (identical logits)
    model_config = gguf.config
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    model = type(gguf)(model_config)
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(str(path / "model"))
    load_tokenizer(inputs.tokenizer.output("tokenizer")).save_pretrained(str(path / "model"))
    n_params = sum(p.numel() for p in model.parameters())
    return StageOutput(
        {"model": "model"}, {"pretrained": f"{inputs.name_or_path}/{inputs.gguf_file}", "params": n_params}
    )


def train_base_model(inputs: BaseModelInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.losses import SFTLoss
    from madpo.modeling import build_causal_lm, load_tokenizer
    from madpo.modules.policy import PolicyLightningModule

    cfg = inputs.cfg
    training.seed_everything(cfg.seed)
    tok = load_tokenizer(inputs.tokenizer.output("tokenizer"))
    model = build_causal_lm(tok, seed=cfg.seed, **_lm_config(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    init = path / "init"
    model.save_pretrained(str(init))
    tok.save_pretrained(str(init))
    del model
    data, slices = load_reviews(inputs.reviews), load_slices(inputs.reviews)
    held = set(slices.oracle_heldout)
    chars = cfg.lm_seq_len * 8  # plenty for lm_seq_len tokens; spares tokenizing whole reviews
    train_texts = [t[:chars] for i, t in enumerate(data["text"]) if i not in held]
    val_texts = [t[:chars] for t in slices.texts(data, "oracle_heldout")[: cfg.lm_val_reviews]]
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(train_texts))  # mix positives and negatives (IMDB order is sorted by label)
    n_needed = min(len(train_texts), cfg.lm_steps * cfg.lm_batch_size)
    train_texts = [train_texts[i] for i in order[:n_needed]]
    say(
        f"base model: Llama {n_params / 1e6:.2f}M parameters, {cfg.lm_steps} steps x {cfg.lm_batch_size} "
        f"sequences x {cfg.lm_seq_len} tokens, lr {cfg.lm_lr:g}"
    )

    def sft_rows(texts: list[str]) -> Any:
        return training.dataset([{"prompt": "", "completion": t} for t in texts], ("prompt", "completion"))

    module = PolicyLightningModule(
        str(init),
        loss=SFTLoss(),
        optimizer=training.optimizer_options(inputs.training, cfg.lm_lr, cfg.lm_warmup_ratio),
        export_dir=str(path / "model"),
    )
    result, _ = training.fit(
        ctx,
        inputs.training,
        path,
        module,
        sft_rows(train_texts),
        sft_rows(val_texts) if val_texts else None,
        tokenizer=str(init),
        max_length=cfg.lm_seq_len,
        max_prompt_length=min(4, cfg.lm_seq_len - 1),
        batch_size=cfg.lm_batch_size,
        seed=cfg.seed,
        epochs=max(1, math.ceil(cfg.lm_steps * cfg.lm_batch_size / len(train_texts))),
        max_steps=cfg.lm_steps,
    )
    shutil.rmtree(init)
    return StageOutput({"model": "model"}, {"params": n_params, "n_train_reviews": len(train_texts), **result})


def stage_base_model(ctx: Context, inputs: PretrainedModelInputs | BaseModelInputs) -> StageResult:
    """From scratch: a Llama of the configured shape, trained as an LM on the start of every review outside the
    oracle's held-out slice (prompt = "" i.e. BOS, completion = the review), with a validation NLL on held-out
    reviews. Pretrained: the model as given (a GGUF file converted once into a transformers directory)."""
    if isinstance(inputs, PretrainedModelInputs):
        return run_stage(ctx, inputs, convert_pretrained)
    return run_stage(ctx, inputs, train_base_model)
