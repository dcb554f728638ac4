"""Stage 1, `reviews`: the 25,000 labelled IMDB reviews (a saved `datasets` dir) and the slices of them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from madpo.pipeline.config import DataConfig
from madpo.pipeline.stages.base import Context, StageInputs, StageOutput, StageResult, run_stage, write_json_atomic


@dataclass(frozen=True)
class ReviewsInputs(StageInputs):
    """What the reviews stage reads of `DataConfig` (not `prompt_tokens`: the SFT and pairs stages read that)."""

    stage = "reviews"
    source: str
    n_prompts: int
    n_sft: int
    n_oracle_train: int
    n_oracle_heldout: int
    seed: int

    @classmethod
    def of(cls, cfg: DataConfig) -> ReviewsInputs:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def load_reviews_and_slices(inputs: ReviewsInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.pipeline.reviews import imdb_slices, load_imdb_reviews

    reviews = load_imdb_reviews(inputs.source)
    slices = imdb_slices(
        reviews["label"],
        n_prompts=inputs.n_prompts,
        n_sft=inputs.n_sft,
        n_oracle_train=inputs.n_oracle_train,
        n_oracle_heldout=inputs.n_oracle_heldout,
        seed=inputs.seed,
    )
    for part in ("prompts", "sft"):
        if not getattr(slices, part):
            raise ValueError(f"the {part} slice is empty (data.n_{part}=0): nothing to train or sample from")
    reviews.save_to_disk(str(path / "reviews"))
    write_json_atomic(path / "slices.json", dataclasses.asdict(slices))
    labels = np.asarray(reviews["label"])
    return StageOutput(
        {"reviews": "reviews", "slices": "slices.json"},
        {"n_reviews": len(reviews), "n_positive": int(labels.sum()), "slices": slices.describe()},
    )


def stage_reviews(ctx: Context, inputs: ReviewsInputs) -> StageResult:
    """The 25,000 labelled IMDB reviews (saved as a `datasets` dir) and the slices of them (slices.json)."""
    return run_stage(ctx, inputs, load_reviews_and_slices)


def load_reviews(reviews: StageResult) -> Any:
    """The saved reviews dataset (`text`, `label`) of the reviews stage."""
    import datasets

    return datasets.load_from_disk(reviews.output("reviews"))


def load_slices(reviews: StageResult) -> Any:
    from madpo.pipeline.reviews import ImdbSlices

    raw = json.loads(Path(reviews.output("slices")).read_text())
    return ImdbSlices(**{k: tuple(v) for k, v in raw.items()})
