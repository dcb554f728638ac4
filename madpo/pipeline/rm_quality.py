"""How good a reward model is, measured against the pipeline's known label model (docs/method.md eq. (35)–(36)).

The pairs' labels are Bradley–Terry draws from the oracle, P(chosen ≻ rejected) = σ(g) with g = oracle_chosen −
oracle_rejected, so the best any reward model can do is known: the Bayes loss mean −log σ(g) on the same noisy
labels. A reward model's margins m = r(chosen) − r(rejected) are then judged by

- `rm_bt_loss` = mean −log σ(m) and `rm_accuracy` = mean(m > 0), against the noisy labels (what validation logs);
- `bayes_bt_loss` = mean −log σ(g) and `bayes_accuracy` = mean(g > 0), the true label model's: the floor;
- `bt_excess` = rm_bt_loss − bayes_bt_loss (0: as good as the truth; log 2 − bayes_bt_loss: a constant margin of 0;
  on a finite sample of noisy labels it can fall a little below 0);
- `oracle_agreement`: the share of pairs with g ≠ 0 where sign(m) = sign(g) (m = 0 counts as a disagreement);
- `corr` = Pearson corr(m, g), and `calibration_slope`, the least-squares slope (with intercept) of m on g: 1 where
  the margins are on the oracle's scale, below 1 where they are too timid, above where over-confident.

A reward model "at chance" has rm_accuracy ≈ 0.5, agreement ≈ 0.5 and corr ≈ 0 whatever its validation loss says.
`tfidf_bt_reference` is the yardstick: a linear Bradley–Terry model on TF-IDF n-grams, trained on the same pairs, so
a neural reward model below it has learnt less than bag-of-words statistics carry. Pure numpy/scikit-learn, float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

QUALITY_KEYS = (
    "rm_bt_loss",
    "rm_accuracy",
    "bayes_bt_loss",
    "bayes_accuracy",
    "bt_excess",
    "oracle_agreement",
    "corr",
    "calibration_slope",
)


def _neg_log_sigmoid(x: np.ndarray) -> np.ndarray:
    """−log σ(x) = log(1 + e^(−x)), exact for large |x| (no overflow, no log of 0)."""
    return np.logaddexp(0.0, -x)


def _as_vector(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"rm_quality: {name} has a non-finite value at position {bad}")
    return arr


def rm_quality(margins: Sequence[float] | np.ndarray, oracle_gaps: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """The reward-model quality measures of the module docstring, for margins m and oracle gaps g of the same pairs
    (chosen = the label's winner). `n` is the number of pairs, `n_informative` those with g ≠ 0; a measure that is
    undefined on the data (no pairs, a constant m or g for `corr`/`calibration_slope`, no g ≠ 0) is None."""
    m, g = _as_vector("margins", margins), _as_vector("oracle_gaps", oracle_gaps)
    if m.shape != g.shape:
        raise ValueError(f"rm_quality: {m.size} margins for {g.size} oracle gaps")
    out: dict[str, Any] = {"n": int(m.size), "n_informative": int((g != 0).sum())}
    if m.size == 0:
        return {**out, **dict.fromkeys(QUALITY_KEYS)}
    rm_loss, bayes_loss = float(_neg_log_sigmoid(m).mean()), float(_neg_log_sigmoid(g).mean())
    informative = g != 0
    varies = m.size > 1 and m.std() > 0 and g.std() > 0
    g_centred = g - g.mean()
    out.update(
        {
            "rm_bt_loss": rm_loss,
            "rm_accuracy": float((m > 0).mean()),
            "bayes_bt_loss": bayes_loss,
            "bayes_accuracy": float((g > 0).mean()),
            "bt_excess": rm_loss - bayes_loss,
            "oracle_agreement": float((np.sign(m[informative]) == np.sign(g[informative])).mean())
            if informative.any()
            else None,
            "corr": float(np.corrcoef(m, g)[0, 1]) if varies else None,
            "calibration_slope": float((g_centred * (m - m.mean())).sum() / (g_centred**2).sum())
            if g.size > 1 and g.std() > 0
            else None,
        }
    )
    return out


def _texts(rows: Sequence[dict], side: str) -> list[str]:
    return [r["prompt"] + r[side] for r in rows]


def _gaps(rows: Sequence[dict]) -> np.ndarray:
    return np.asarray([r["oracle_chosen"] - r["oracle_rejected"] for r in rows], dtype=np.float64)


def tfidf_bt_margins(train_rows: Sequence[dict], val_rows: Sequence[dict], *, C: float = 1.0) -> tuple[np.ndarray, int]:
    """(margins on `val_rows`, number of features) of a TF-IDF Bradley–Terry model trained on `train_rows` (dicts
    with `prompt`, `chosen`, `rejected`, as the pairs stage writes them).

    TF-IDF (word 1–2-grams, min_df 2, sublinear tf) is fit on the training pairs' texts, prompt + completion of both
    sides; a pair's features are x_chosen − x_rejected, and a logistic regression without intercept on them is
    exactly a linear Bradley–Terry reward r(x) = w·x (P(chosen ≻ rejected) = σ(w·(x_c − x_r))). Every training pair
    says "chosen wins", one class only, so the flipped differences enter with label 0: the same likelihood, and both
    classes for the solver. Its margins on the validation pairs are w·(x_c − x_r)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if not train_rows or not val_rows:
        raise ValueError(
            f"tfidf_bt_reference: needs training and validation pairs, got {len(train_rows)} and {len(val_rows)}"
        )
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    vectorizer.fit(_texts(train_rows, "chosen") + _texts(train_rows, "rejected"))

    def differences(rows: Sequence[dict]) -> Any:
        return vectorizer.transform(_texts(rows, "chosen")) - vectorizer.transform(_texts(rows, "rejected"))

    d_train = differences(train_rows)
    features = sp.vstack([d_train, -d_train]).tocsr()
    labels = np.concatenate([np.ones(len(train_rows)), np.zeros(len(train_rows))])
    model = LogisticRegression(fit_intercept=False, C=C, max_iter=1000).fit(features, labels)
    margins = np.asarray(differences(val_rows) @ model.coef_[0], dtype=np.float64).reshape(-1)
    return margins, len(vectorizer.vocabulary_)


def tfidf_bt_reference(train_rows: Sequence[dict], val_rows: Sequence[dict], *, C: float = 1.0) -> dict[str, Any]:
    """`rm_quality` of the TF-IDF Bradley–Terry model of `tfidf_bt_margins` on `val_rows` (which also carry
    `oracle_chosen`, `oracle_rejected`), trained on `train_rows`. Adds `n_train` and `n_features`."""
    margins, n_features = tfidf_bt_margins(train_rows, val_rows, C=C)
    return {**rm_quality(margins, _gaps(val_rows)), "n_train": len(train_rows), "n_features": n_features}


def quality_line(quality: dict[str, Any], reference: dict[str, Any] | None = None) -> str:
    """One line for a console or a results page: the reward model's measures (and the TF-IDF reference's)."""

    def f(value: Any, spec: str = ".3f") -> str:
        return "–" if value is None else format(value, spec)

    line = (
        f"BT loss {f(quality.get('rm_bt_loss'))} (Bayes floor {f(quality.get('bayes_bt_loss'))}, excess "
        f"{f(quality.get('bt_excess'), '+.3f')}), accuracy {f(quality.get('rm_accuracy'))} (Bayes "
        f"{f(quality.get('bayes_accuracy'))}), oracle agreement {f(quality.get('oracle_agreement'))}, corr "
        f"{f(quality.get('corr'))}, calibration slope {f(quality.get('calibration_slope'), '.2f')} on "
        f"{quality.get('n')} pairs"
    )
    if reference:
        line += (
            f"; TF-IDF BT reference: excess {f(reference.get('bt_excess'), '+.3f')}, agreement "
            f"{f(reference.get('oracle_agreement'))}, corr {f(reference.get('corr'))}"
        )
    return line
