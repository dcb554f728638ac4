"""Stage 2, `tokenizer` <- reviews: a byte-level BPE trained on the reviews, or the pretrained model's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from madpo.pipeline.config import BaseModelConfig, resolve_model_location
from madpo.pipeline.stages.base import Context, StageInputs, StageOutput, StageResult, run_stage
from madpo.pipeline.stages.reviews import load_reviews


@dataclass(frozen=True)
class TokenizerInputs(StageInputs):
    """From scratch: the BPE's size and how many reviews train it; pretrained: the model it comes with."""

    stage = "tokenizer"
    reviews: StageResult
    vocab_size: int | None = None
    tokenizer_reviews: int | None = None
    name_or_path: str | None = None
    gguf_file: str | None = None

    @classmethod
    def of(cls, cfg: BaseModelConfig, reviews: StageResult) -> TokenizerInputs:
        if cfg.name_or_path is None:
            return cls(reviews, vocab_size=cfg.vocab_size, tokenizer_reviews=cfg.tokenizer_reviews)
        return cls(reviews, name_or_path=cfg.name_or_path, gguf_file=cfg.gguf_file)


def build_tokenizer(inputs: TokenizerInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.modeling import load_tokenizer, train_bpe_tokenizer

    out = path / "tokenizer"
    if inputs.name_or_path is None:
        texts = list(load_reviews(inputs.reviews)["text"])
        if inputs.tokenizer_reviews is not None:
            texts = texts[: inputs.tokenizer_reviews]
        tokenizer = train_bpe_tokenizer(texts, out, vocab_size=inputs.vocab_size)
        tokenizer = load_tokenizer(str(out))
    else:
        location = resolve_model_location(inputs.name_or_path)
        if inputs.gguf_file:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=inputs.gguf_file)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer = load_tokenizer(location)
        tokenizer.save_pretrained(str(out))
        texts = list(load_reviews(inputs.reviews)["text"][:1000])
    sample = texts[:1000]
    lengths = [len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"]] if sample else [0]
    return StageOutput(
        {"tokenizer": "tokenizer"},
        {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "mean_tokens_per_review": float(np.mean(lengths)),
        },
    )


def stage_tokenizer(ctx: Context, inputs: TokenizerInputs) -> StageResult:
    """A byte-level BPE trained on the reviews (from scratch), or the pretrained model's tokenizer, saved."""
    return run_stage(ctx, inputs, build_tokenizer)
