"""The offline IMDB experiment's building blocks (docs/method.md §IMDB protocol): reviews and their slices, oracles,
sampling, quality tiers with Gumbel-noise Bradley–Terry labels, and evaluation.

Pure, reusable functions; the pipeline stages compose them. Names load lazily, so importing
`madpo.pipeline.reviews` or `madpo.pipeline.tiers` does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_policy": "evaluate",
    "kl_estimate": "evaluate",
    "log_to_tensorboard": "evaluate",
    "reward_summary": "evaluate",
    "write_results": "evaluate",
    "encode_prompt": "generate",
    "prompt_prefix": "generate",
    "sample_continuations": "generate",
    "split_review": "generate",
    "HFClassifierOracle": "oracle",
    "Oracle": "oracle",
    "TfidfOracle": "oracle",
    "VaderOracle": "oracle",
    "build_oracle": "oracle",
    "checked_scores": "oracle",
    "prob_to_reward": "oracle",
    "ImdbSlices": "reviews",
    "imdb_slices": "reviews",
    "load_imdb_reviews": "reviews",
    "TIERS": "tiers",
    "build_tiers": "tiers",
    "gumbel_labels": "tiers",
    "label_noise_stats": "tiers",
    "make_preference_splits": "tiers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"madpo.pipeline.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'madpo.pipeline' has no attribute {name!r}")
