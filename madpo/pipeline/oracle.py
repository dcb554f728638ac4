"""Oracles: the ground-truth sentiment rewards r*(text) ∈ [−3, 3] that label pairs and evaluate policies.

An oracle is never the reward model; it plays the role of the paper's `cardiffnlp/twitter-roberta-base-sentiment-latest`
with the same mapping r* = 6·(P(positive) − 0.5) (docs/method.md eq. (34)). Implementations:

- `TfidfOracle` (offline default): TF-IDF 1–2-grams + logistic regression trained on labelled IMDB reviews in seconds;
  cached on disk **without pickle** (vocabulary json + float arrays npz), its held-out accuracy recorded.
- `VaderOracle`: 3·compound of the VADER lexicon (`vaderSentiment`).
- `HFClassifierOracle`: any transformers sequence-classification sentiment model (hub id or local dir).

Every score passes `check_scores`: a NaN/inf or out-of-range value stops with an error naming the oracle and row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

REWARD_MIN, REWARD_MAX = -3.0, 3.0
_TFIDF_FORMAT = 1


def prob_to_reward(p_positive: np.ndarray | float) -> np.ndarray:
    """The paper's mapping r* = 6·(P(positive) − 0.5): P = 1 → 3, P = 0.5 → 0, P = 0 → −3."""
    return 6.0 * (np.asarray(p_positive, dtype=np.float64) - 0.5)


@runtime_checkable
class Oracle(Protocol):
    name: str

    def score(self, texts: list[str]) -> np.ndarray:
        """float64 rewards in [−3, 3], one per text."""
        ...

    def describe(self) -> dict:
        """What the oracle is (kind, model, held-out accuracy where known), for results files."""
        ...


def check_scores(scores: Any, texts: Sequence[str], name: str) -> np.ndarray:
    """`scores` as a float64 (n,) array, or a ValueError naming the oracle and the first bad row."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (len(texts),):
        raise ValueError(f"oracle {name!r} returned shape {arr.shape} for {len(texts)} texts; expected ({len(texts)},)")
    bad = ~np.isfinite(arr)
    what = "a non-finite score"
    if not bad.any():
        bad = (arr < REWARD_MIN - 1e-9) | (arr > REWARD_MAX + 1e-9)
        what = f"a score outside [{REWARD_MIN:g}, {REWARD_MAX:g}]"
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"oracle {name!r} returned {what} ({arr[i]!r}) for row {i} of {len(texts)} "
            f"(text starts {texts[i][:80]!r}); {int(bad.sum())} row(s) affected"
        )
    return np.clip(arr, REWARD_MIN, REWARD_MAX)


def checked_scores(oracle: Oracle, texts: Sequence[str]) -> np.ndarray:
    """Score with any `Oracle` (also a user's own) and validate the result."""
    texts = list(texts)
    return check_scores(oracle.score(texts), texts, getattr(oracle, "name", type(oracle).__name__))


def oracle_accuracy(oracle: Oracle, texts: Sequence[str], labels: Sequence[int]) -> float:
    """Fraction of labelled texts whose reward sign matches the label (reward > 0 ⇔ positive)."""
    if len(texts) != len(labels) or not len(texts):
        raise ValueError(f"need as many labels as texts (≥ 1); got {len(texts)} texts, {len(labels)} labels")
    pred = checked_scores(oracle, texts) > 0
    return float(np.mean(pred == (np.asarray(labels) == 1)))


class BaseOracle:
    """Shared plumbing: validation of every score, held-out accuracy bookkeeping, `describe()`."""

    name = "oracle"

    def __init__(self) -> None:
        self.heldout_accuracy: float | None = None
        self.n_heldout: int | None = None

    def _score(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros(0, dtype=np.float64)
        return check_scores(self._score(texts), texts, self.name)

    def measure_accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Measure (and record for `describe()`) the accuracy on a labelled held-out slice."""
        self.heldout_accuracy = oracle_accuracy(self, texts, labels)
        self.n_heldout = len(texts)
        return self.heldout_accuracy

    def describe(self) -> dict:
        return {"name": self.name, "heldout_accuracy": self.heldout_accuracy, "n_heldout": self.n_heldout}


# ----------------------------------------------------------------------------------------------------------------
# TF-IDF + logistic regression
# ----------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$MADPO_CACHE_DIR/oracle`, else `~/.cache/madpo/oracle`."""
    root = os.environ.get("MADPO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "madpo")
    return Path(root) / "oracle"


def _hash_texts(digest: Any, texts: Sequence[str], labels: Sequence[int]) -> None:
    digest.update(f"n={len(texts)}".encode())
    for t in texts:
        b = t.encode("utf-8")
        digest.update(len(b).to_bytes(8, "little") + b)
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())


class TfidfOracle(BaseOracle):
    """TF-IDF (word 1..`ngram_max`-grams, sublinear tf) + logistic regression; reward = 6·(P(positive) − 0.5).

    Build it with `TfidfOracle.fit(texts, labels, heldout_texts=..., heldout_labels=..., cache_dir=...)`; the state
    is a vocabulary, idf weights and the LR coefficients, saved as json + npz (`allow_pickle=False`).
    """

    name = "tfidf"

    def __init__(
        self,
        vocabulary: dict[str, int],
        idf: np.ndarray,
        coef: np.ndarray,
        intercept: float,
        *,
        params: dict,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        from sklearn.feature_extraction.text import TfidfVectorizer

        idf = np.asarray(idf, dtype=np.float64)
        coef = np.asarray(coef, dtype=np.float64).reshape(-1)
        if not (len(vocabulary) == idf.size == coef.size) or sorted(vocabulary.values()) != list(range(idf.size)):
            raise ValueError(
                f"inconsistent TF-IDF oracle state: {len(vocabulary)} vocabulary entries, {idf.size} idf weights, "
                f"{coef.size} coefficients (vocabulary indices must be 0..n-1)"
            )
        self.params = dict(params)
        self.meta = dict(meta or {})
        self.vocabulary = dict(vocabulary)
        self.vectorizer = TfidfVectorizer(
            ngram_range=(1, int(params["ngram_max"])),
            sublinear_tf=bool(params["sublinear_tf"]),
            lowercase=True,
            vocabulary=self.vocabulary,
            dtype=np.float64,
        )
        self.vectorizer.idf_ = idf
        self.coef = coef
        self.intercept = float(intercept)
        self.heldout_accuracy = self.meta.get("heldout_accuracy")
        self.n_heldout = self.meta.get("n_heldout")

    # -- scoring -----------------------------------------------------------------------------------------------
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        features = self.vectorizer.transform(list(texts))
        return np.asarray(features @ self.coef, dtype=np.float64) + self.intercept

    def prob_positive(self, texts: Sequence[str]) -> np.ndarray:
        from scipy.special import expit

        return expit(self.logits(texts))

    def _score(self, texts: list[str]) -> np.ndarray:
        return prob_to_reward(self.prob_positive(texts))

    def describe(self) -> dict:
        extra = {k: v for k, v in self.meta.items() if k not in ("heldout_accuracy", "n_heldout")}
        return {**super().describe(), **extra, "params": self.params, "vocabulary_size": int(self.coef.size)}

    # -- training ----------------------------------------------------------------------------------------------
    @staticmethod
    def cache_key(
        texts: Sequence[str],
        labels: Sequence[int],
        heldout_texts: Sequence[str] | None,
        heldout_labels: Sequence[int] | None,
        params: dict,
    ) -> str:
        import sklearn

        digest = hashlib.blake2b(digest_size=16)
        digest.update(
            json.dumps({"format": _TFIDF_FORMAT, "sklearn": sklearn.__version__, **params}, sort_keys=True).encode()
        )
        _hash_texts(digest, texts, labels)
        _hash_texts(digest, heldout_texts or [], heldout_labels or [])
        return digest.hexdigest()

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[int],
        *,
        heldout_texts: Sequence[str] | None = None,
        heldout_labels: Sequence[int] | None = None,
        cache_dir: str | Path | None = None,
        ngram_max: int = 2,
        min_df: int = 2,
        C: float = 10.0,
        sublinear_tf: bool = True,
        max_features: int | None = None,
        seed: int = 0,
    ) -> TfidfOracle:
        """Train on labelled texts (0 negative / 1 positive), measure held-out accuracy if a held-out slice is given,
        and cache the result under `cache_dir` (None: no cache) keyed by the data and hyperparameters."""
        texts, labels = list(texts), [int(v) for v in labels]
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"TF-IDF oracle: need as many labels as texts (≥ 1); got {len(texts)} and {len(labels)}")
        if set(labels) != {0, 1}:
            raise ValueError(f"TF-IDF oracle: labels must contain both 0 and 1 only; got {sorted(set(labels))}")
        if (heldout_texts is None) != (heldout_labels is None):
            raise ValueError("TF-IDF oracle: pass both heldout_texts and heldout_labels, or neither")
        params = {
            "ngram_max": ngram_max,
            "min_df": min_df,
            "C": C,
            "sublinear_tf": sublinear_tf,
            "max_features": max_features,
            "seed": seed,
        }
        key = cls.cache_key(texts, labels, heldout_texts, heldout_labels, params)
        target = Path(cache_dir) / f"tfidf-{key}" if cache_dir is not None else None
        if target is not None and (target / "meta.json").is_file():
            oracle = cls.load(target)
            log.info("TF-IDF oracle loaded from cache %s (held-out accuracy %s)", target, oracle.heldout_accuracy)
            return oracle

        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        start = time.perf_counter()
        vectorizer = TfidfVectorizer(
            ngram_range=(1, ngram_max),
            min_df=min_df,
            sublinear_tf=sublinear_tf,
            max_features=max_features,
            lowercase=True,
            dtype=np.float64,
        )
        features = vectorizer.fit_transform(texts)
        lr = LogisticRegression(C=C, solver="liblinear", max_iter=1000, random_state=seed)
        lr.fit(features, labels)
        train_seconds = time.perf_counter() - start
        if list(lr.classes_) != [0, 1]:  # pragma: no cover - guarded above
            raise RuntimeError(f"unexpected classes {lr.classes_}")
        vocabulary = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
        meta = {"n_train": len(texts), "train_seconds": round(train_seconds, 3), "cache_key": key}
        oracle = cls(vocabulary, vectorizer.idf_, lr.coef_[0], float(lr.intercept_[0]), params=params, meta=meta)
        if heldout_texts is not None:
            heldout_texts = list(heldout_texts)
            # the rebuilt scorer must be sklearn's fitted pipeline, to the bit
            expected = lr.predict_proba(vectorizer.transform(heldout_texts))[:, 1]
            if not np.allclose(oracle.prob_positive(heldout_texts), expected, rtol=0, atol=1e-12):
                raise RuntimeError("TF-IDF oracle: rebuilt scorer disagrees with the fitted sklearn pipeline")
            oracle.measure_accuracy(heldout_texts, list(heldout_labels))
            oracle.meta["heldout_accuracy"] = oracle.heldout_accuracy
            oracle.meta["n_heldout"] = oracle.n_heldout
        log.info(
            "TF-IDF oracle trained on %d reviews in %.1f s, vocabulary %d, held-out accuracy %s",
            len(texts),
            train_seconds,
            len(vocabulary),
            oracle.heldout_accuracy,
        )
        if target is not None:
            oracle.save(target)
        return oracle

    # -- persistence (no pickle) -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `vocabulary.json`, `arrays.npz`, `meta.json` to a temp dir beside `path`, then rename it into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            with open(tmp / "vocabulary.json", "w", encoding="utf-8") as f:
                json.dump(self.vocabulary, f, ensure_ascii=False)
            np.savez(
                tmp / "arrays.npz",
                idf=self.vectorizer.idf_,
                coef=self.coef,
                intercept=np.asarray([self.intercept], dtype=np.float64),
            )
            with open(tmp / "meta.json", "w") as f:
                json.dump({"format": _TFIDF_FORMAT, "params": self.params, **self.meta}, f, indent=2)
            try:
                os.rename(tmp, path)
            except OSError:
                if not (path / "meta.json").is_file():  # a concurrent writer may have won the race; else re-raise
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> TfidfOracle:
        path = Path(path)
        with open(path / "meta.json") as f:
            meta = json.load(f)
        if meta.pop("format", None) != _TFIDF_FORMAT:
            raise ValueError(f"{path}: not a TF-IDF oracle cache of format {_TFIDF_FORMAT}")
        params = meta.pop("params")
        with open(path / "vocabulary.json", encoding="utf-8") as f:
            vocabulary = json.load(f)
        with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
            idf, coef, intercept = arrays["idf"], arrays["coef"], float(arrays["intercept"][0])
        return cls(vocabulary, idf, coef, intercept, params=params, meta=meta)


def tfidf_oracle_from_imdb(
    reviews: Any, slices: Any, *, cache_dir: str | Path | None = None, **hparams: Any
) -> TfidfOracle:
    """A `TfidfOracle` trained on `slices.oracle_train` of `load_imdb_reviews()` and measured on
    `slices.oracle_heldout` (see `madpo.pipeline.reviews.imdb_slices`)."""
    if not slices.oracle_train:
        raise ValueError("the slices have no oracle_train rows: pass n_oracle_train > 0 to imdb_slices")
    heldout = bool(slices.oracle_heldout)
    return TfidfOracle.fit(
        slices.texts(reviews, "oracle_train"),
        slices.labels(reviews, "oracle_train"),
        heldout_texts=slices.texts(reviews, "oracle_heldout") if heldout else None,
        heldout_labels=slices.labels(reviews, "oracle_heldout") if heldout else None,
        cache_dir=cache_dir,
        **hparams,
    )


# ----------------------------------------------------------------------------------------------------------------
# VADER
# ----------------------------------------------------------------------------------------------------------------


ORACLE_KINDS = ("tfidf", "vader", "hf")


def build_oracle(kind: str, **kwargs: Any) -> BaseOracle:
    """An oracle by kind:

    - `"tfidf"`: `path=<cache entry dir>` loads a saved one; `reviews=..., slices=...` trains on the IMDB oracle
      slices; otherwise `texts=..., labels=...` (+ `heldout_texts`, `heldout_labels`, `cache_dir`, hyperparameters).
    - `"vader"`: no arguments.
    - `"hf"` (or a hub id / local directory given as the kind): `model_name_or_path`, `positive_label`, ...
    """
    if kind == "tfidf":
        if "path" in kwargs:
            return TfidfOracle.load(kwargs.pop("path"))
        if "reviews" in kwargs or "slices" in kwargs:
            return tfidf_oracle_from_imdb(kwargs.pop("reviews"), kwargs.pop("slices"), **kwargs)
        if "texts" not in kwargs or "labels" not in kwargs:
            raise ValueError(
                "build_oracle('tfidf') needs path=..., reviews=... and slices=..., or texts=... and labels=..."
            )
        return TfidfOracle.fit(kwargs.pop("texts"), kwargs.pop("labels"), **kwargs)
    if kind == "vader":
        return VaderOracle(**kwargs)
    if kind in ("hf", "hf_classifier"):
        return HFClassifierOracle(**kwargs)
    if "/" in kind or os.path.isdir(kind):
        return HFClassifierOracle(kind, **kwargs)
    raise ValueError(f"unknown oracle kind {kind!r}; expected one of {ORACLE_KINDS} or a hub id / local model dir")


__all__ = [
    "BaseOracle",
    "HFClassifierOracle",
    "ORACLE_KINDS",
    "Oracle",
    "TfidfOracle",
    "VaderOracle",
    "build_oracle",
    "check_scores",
    "checked_scores",
    "default_cache_dir",
    "oracle_accuracy",
    "prob_to_reward",
    "tfidf_oracle_from_imdb",
]


from madpo.pipeline.pretrained_oracles import HFClassifierOracle, VaderOracle  # noqa: E402 (they build on BaseOracle)
