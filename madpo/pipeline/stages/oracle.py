"""Stage 3, `oracle` <- reviews, tokenizer: the sentiment oracle (TF-IDF trained here; VADER or a transformers
classifier as given), its held-out accuracy on full reviews and on snippets as long as the texts it will score."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from madpo.pipeline.config import OracleConfig
from madpo.pipeline.stages.base import (
    Context,
    StageInputs,
    StageOutput,
    StageResult,
    device_for,
    run_stage,
    say,
)
from madpo.pipeline.stages.reviews import load_reviews, load_slices


@dataclass(frozen=True)
class OracleInputs(StageInputs):
    """The oracle section, the snippet length it is measured at, the device of a transformers classifier (None for
    the CPU-only TF-IDF and VADER oracles) and the reviews and tokenizer."""

    stage = "oracle"
    cfg: OracleConfig
    snippet_tokens: int
    accelerator: str | None
    reviews: StageResult
    tokenizer: StageResult

    @classmethod
    def of(
        cls, cfg: OracleConfig, snippet_tokens: int, accelerator: str, reviews: StageResult, tokenizer: StageResult
    ) -> OracleInputs:
        return cls(cfg, snippet_tokens, accelerator if cfg.kind == "hf" else None, reviews, tokenizer)


def _given_oracle(cfg: OracleConfig, device: str) -> Any:
    """A VADER or transformers-classifier oracle (the TF-IDF one is trained, or loaded from its stage)."""
    from madpo.pipeline.oracle import HFClassifierOracle, VaderOracle

    if cfg.kind == "vader":
        return VaderOracle()
    return HFClassifierOracle(
        str(cfg.model), cfg.positive_label, batch_size=cfg.batch_size, max_length=cfg.max_length, device=device
    )


def train_and_measure_oracle(inputs: OracleInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.modeling import load_tokenizer
    from madpo.pipeline.oracle import TfidfOracle, oracle_accuracy

    cfg, snippet_tokens = inputs.cfg, inputs.snippet_tokens
    data, slices = load_reviews(inputs.reviews), load_slices(inputs.reviews)
    if not slices.oracle_heldout:
        raise ValueError("data.n_oracle_heldout=0: the oracle's accuracy cannot be measured")
    held_texts, held_labels = slices.texts(data, "oracle_heldout"), slices.labels(data, "oracle_heldout")
    outputs: dict[str, str] = {}
    start = time.perf_counter()
    if cfg.kind == "tfidf":
        oracle: Any = TfidfOracle.fit(
            slices.texts(data, "oracle_train"),
            slices.labels(data, "oracle_train"),
            heldout_texts=held_texts,
            heldout_labels=held_labels,
            cache_dir=path,
            ngram_max=cfg.ngram_max,
            min_df=cfg.min_df,
            C=cfg.C,
        )
        outputs["oracle"] = f"tfidf-{oracle.meta['cache_key']}"
    else:
        oracle = _given_oracle(cfg, device_for(inputs.accelerator or "cpu"))
        oracle.measure_accuracy(held_texts, held_labels)
    seconds = time.perf_counter() - start
    tok = load_tokenizer(inputs.tokenizer.output("tokenizer"))
    ids = tok(held_texts, add_special_tokens=False)["input_ids"]
    snippets = tok.batch_decode(
        [i[:snippet_tokens] for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    snippet_acc = oracle_accuracy(oracle, snippets, held_labels)
    stats = {
        **oracle.describe(),
        "heldout_accuracy": oracle.heldout_accuracy,
        "n_heldout": oracle.n_heldout,
        "snippet_tokens": snippet_tokens,
        "snippet_accuracy": snippet_acc,
        "seconds_train_and_measure": round(seconds, 2),
    }
    say(
        f"oracle {cfg.kind}: held-out accuracy {oracle.heldout_accuracy:.3f} on {len(held_texts)} full reviews, "
        f"{snippet_acc:.3f} on their first {snippet_tokens} tokens"
    )
    return StageOutput(outputs, stats)


def stage_oracle(ctx: Context, inputs: OracleInputs) -> StageResult:
    """Train (TF-IDF) or load (VADER, HF) the oracle; its accuracy on held-out reviews, whole and cut to
    `snippet_tokens` tokens (the length of prompt + continuation it will score)."""
    return run_stage(ctx, inputs, train_and_measure_oracle)


def load_oracle(oracle: StageResult, cfg: OracleConfig, device: str = "cpu") -> Any:
    """The oracle of the oracle stage (the TF-IDF model from disk; VADER / HF rebuilt), with its accuracy set."""
    from madpo.pipeline.oracle import TfidfOracle

    if cfg.kind == "tfidf":
        return TfidfOracle.load(oracle.output("oracle"))
    built = _given_oracle(cfg, device)
    built.heldout_accuracy = oracle.stats.get("heldout_accuracy")
    built.n_heldout = oracle.stats.get("n_heldout")
    return built
