"""madpo.pipeline.rm_quality: the reward-model quality measures against hand-computed values, and the TF-IDF
Bradley–Terry reference on pairs whose words decide the label."""

import math

import numpy as np
import pytest

from madpo.pipeline.rm_quality import quality_line, rm_quality, tfidf_bt_reference


def nls(x: float) -> float:
    """−log σ(x), written out."""
    return math.log(1.0 + math.exp(-x))


def test_measures_equal_hand_computation():
    q = rm_quality([2.0, -1.0, 0.5], [1.0, 1.0, -2.0])
    rm_loss = (nls(2.0) + nls(-1.0) + nls(0.5)) / 3
    bayes = (nls(1.0) + nls(1.0) + nls(-2.0)) / 3
    assert q["n"] == 3 and q["n_informative"] == 3
    assert q["rm_bt_loss"] == pytest.approx(rm_loss, rel=1e-12)
    assert q["bayes_bt_loss"] == pytest.approx(bayes, rel=1e-12)
    assert q["bt_excess"] == pytest.approx(rm_loss - bayes, rel=1e-12)
    assert q["rm_accuracy"] == pytest.approx(2 / 3) and q["bayes_accuracy"] == pytest.approx(2 / 3)
    assert q["oracle_agreement"] == pytest.approx(1 / 3)  # only the first pair's signs agree
    # m − mean(m) = (1.5, −1.5, 0) is orthogonal to g − mean(g) = (1, 1, −2): no correlation, slope 0
    assert q["corr"] == pytest.approx(0.0, abs=1e-12) and q["calibration_slope"] == pytest.approx(0.0, abs=1e-12)


def test_ties_slope_and_correlation_by_hand():
    # g − mean(g) = (−4/3, −1/3, 5/3), m − mean(m) = (−1, 0, 1): Σ products 3, Σ g² 14/3, Σ m² 2
    q = rm_quality(np.array([1.0, 2.0, 3.0]), [0.0, 1.0, 3.0])
    assert q["n_informative"] == 2 and q["oracle_agreement"] == 1.0  # the g = 0 pair is left out
    assert q["calibration_slope"] == pytest.approx(9 / 14, rel=1e-12)
    assert q["corr"] == pytest.approx(3 / math.sqrt(14 / 3 * 2), rel=1e-12)
    assert rm_quality([0.0, 1.0], [1.0, 1.0])["oracle_agreement"] == 0.5  # m = 0 is no agreement
    assert rm_quality([1.0, 2.0], [1.0, 1.0])["calibration_slope"] is None  # constant g: undefined


def test_perfect_reward_model_has_no_excess_and_slope_one():
    g = np.array([0.3, -1.2, 2.5, 0.0, -0.1, 4.0])
    q = rm_quality(g, g)
    assert q["bt_excess"] == 0.0 and q["oracle_agreement"] == 1.0
    assert q["calibration_slope"] == pytest.approx(1.0, rel=1e-12) and q["corr"] == pytest.approx(1.0, rel=1e-12)
    timid = rm_quality(0.5 * np.abs(g), np.abs(g))  # labels all with the oracle: a timid RM loses more than σ(g)
    assert timid["calibration_slope"] == pytest.approx(0.5) and timid["bt_excess"] > 0


def test_log_sigmoid_is_stable_and_bad_input_is_refused():
    q = rm_quality([-800.0, 800.0], [1.0, 1.0])
    assert q["rm_bt_loss"] == pytest.approx(400.0) and math.isfinite(q["bt_excess"])
    with pytest.raises(ValueError, match="non-finite"):
        rm_quality([float("nan")], [1.0])
    with pytest.raises(ValueError, match="2 margins for 1"):
        rm_quality([1.0, 2.0], [1.0])
    assert rm_quality([], [])["rm_bt_loss"] is None


def _pairs(n: int, seed: int, flip: bool) -> list[dict]:
    """Pairs where the words decide: the oracle prefers the 'great'/'wonderful' text to the 'awful'/'boring' one.
    The training labels follow the oracle; with `flip` about half the labels go against it (g < 0), so agreement
    tests the sign both ways."""
    rng = np.random.default_rng(seed)
    good = ["great fun", "wonderful acting", "great story", "wonderful film"]
    bad = ["awful mess", "boring plot", "awful acting", "boring film"]
    rows = []
    for i in range(n):
        prompt = f"the movie {['was', 'is'][i % 2]} "
        win, lose = good[rng.integers(4)], bad[rng.integers(4)]
        up = not flip or bool(rng.integers(2))
        chosen, rejected = (win, lose) if up else (lose, win)
        rows.append(
            {
                "prompt": prompt,
                "chosen": " " + chosen,
                "rejected": " " + rejected,
                "oracle_chosen": 1.0 if up else -1.0,
                "oracle_rejected": -1.0 if up else 1.0,
            }
        )
    return rows


def test_tfidf_reference_learns_the_deciding_words():
    ref = tfidf_bt_reference(_pairs(60, 0, flip=False), _pairs(30, 1, flip=True))
    assert ref["n"] == 30 and ref["n_train"] == 60 and ref["n_features"] > 0
    assert ref["oracle_agreement"] == 1.0 and ref["corr"] > 0.9
    assert 0 < ref["bayes_accuracy"] < 1 and ref["rm_accuracy"] == pytest.approx(ref["bayes_accuracy"])
    assert "TF-IDF BT reference" in quality_line(rm_quality([1.0], [1.0]), ref)
    with pytest.raises(ValueError, match="needs training and validation pairs"):
        tfidf_bt_reference([], _pairs(3, 0, flip=False))
