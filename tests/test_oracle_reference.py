"""bench/oracle_reference.py's measures against hand-computed values, and tfidf_bt_margins against the reference
report built on it. The script end to end on the CI pipeline's cached stages is in tests/test_pipeline.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from madpo.pipeline.rm_quality import rm_quality, tfidf_bt_margins, tfidf_bt_reference
from tests.helpers import load_bench_script
from tests.test_rm_quality import _pairs


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    return load_bench_script("oracle_reference", monkeypatch)


def test_agreement_by_hand(bench) -> None:
    # truth 0 leaves the last pair out; of (+,+), (−,+), (0,−) only the first agrees (a zero score disagrees)
    a = bench.agreement(np.array([1.0, -2.0, 0.0, 3.0]), np.array([2.0, 1.0, -1.0, 0.0]))
    assert a["n"] == 3 and a["agreement"] == pytest.approx(1 / 3)
    assert a["se"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 3))
    # deviations (0.5, −2.5, −0.5, 2.5) and (1.5, 0.5, −1.5, −0.5): Σ products −1, Σ squares 13 and 5
    assert a["corr"] == pytest.approx(-1 / math.sqrt(65), rel=1e-12)


def test_labels_agree_where_the_truth_prefers_chosen(bench) -> None:
    a = bench.agreement(np.ones(5), np.array([0.3, -0.1, 2.0, 0.0, -4.0]))
    assert a["n"] == 4 and a["agreement"] == 0.5 and a["corr"] is None  # constant scores have no correlation


def test_balanced_takes_as_many_of_each_class_as_the_rarer_has(bench) -> None:
    labels = np.array([0] * 30 + [1] * 70)
    picked = bench.balanced(np.arange(10, 100), labels, seed=0)
    assert (labels[picked] == 0).sum() == (labels[picked] == 1).sum() == 20  # 20 negatives among rows 10..99
    assert len(set(picked.tolist())) == 40 and picked.min() >= 10
    assert np.array_equal(picked, bench.balanced(np.arange(10, 100), labels, seed=0))
    capped = bench.balanced(np.arange(10, 100), labels, seed=0, most=9)
    assert (labels[capped] == 0).sum() == (labels[capped] == 1).sum() == 4


def test_tfidf_margins_are_the_reference_reports() -> None:
    train, val = _pairs(60, 0, flip=False), _pairs(30, 1, flip=True)
    margins, n_features = tfidf_bt_margins(train, val)
    gaps = [r["oracle_chosen"] - r["oracle_rejected"] for r in val]
    ref = tfidf_bt_reference(train, val)
    assert ref == {**rm_quality(margins, gaps), "n_train": 60, "n_features": n_features}
    assert margins.shape == (30,) and np.isfinite(margins).all()


def test_held_pairs_never_include_the_validation_slice(bench) -> None:
    """The scored eval pairs start past the reward model's early-stopping slice; --held-from may only move later."""
    from madpo.pipeline.config import PipelineConfig

    cfg = PipelineConfig()
    cfg.reward.n_val = 256
    assert bench.held_start(cfg, None) == 256
    assert bench.held_start(cfg, 1000) == 1000
    with pytest.raises(SystemExit, match="inside the reward model's validation slice"):
        bench.held_start(cfg, 255)
    cfg.reward.n_val = None  # validated on every eval pair: none is held out
    with pytest.raises(SystemExit, match="validated on every eval pair"):
        bench.held_start(cfg, None)
