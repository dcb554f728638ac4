import numpy as np
import pytest
from scipy.special import expit

from madpo.pipeline.tiers import (
    build_tiers,
    gumbel_labels,
    label_noise_stats,
    make_preference_splits,
)

# four prompts; which sample is best varies, row 3 ties (sample 1 wins the tie)
PROMPTS = ["p0", "p1", "p2", "p3"]
S1 = ["a0", "a1", "a2", "a3"]
S2 = ["b0", "b1", "b2", "b3"]
ORIG = ["o0", "o1", "o2", "o3"]
R1 = [1.0, -2.0, 0.5, 0.2]
R2 = [0.0, 2.5, -1.0, 0.2]
RO = [-3.0, -2.9, -2.8, -2.7]


def pairs(rows):
    return [(r["text_a"], r["text_b"], r["oracle_a"], r["oracle_b"]) for r in rows]


def test_tier_composition_exact():
    tiers = build_tiers(PROMPTS, S1, S2, ORIG, R1, R2, RO)
    assert set(tiers) == {"high", "medium", "low"}
    high = [("a0", "b0", 1.0, 0.0), ("a1", "b1", -2.0, 2.5), ("a2", "b2", 0.5, -1.0), ("a3", "b3", 0.2, 0.2)]
    low = [("a0", "o0", 1.0, -3.0), ("b1", "o1", 2.5, -2.9), ("a2", "o2", 0.5, -2.8), ("a3", "o3", 0.2, -2.7)]
    assert pairs(tiers["high"]) == high
    assert pairs(tiers["low"]) == low
    assert pairs(tiers["medium"]) == low[:2] + high[2:]  # first half as low, the rest as high
    assert [r["prompt"] for r in tiers["medium"]] == PROMPTS
    assert [r["prompt_index"] for r in tiers["low"]] == [0, 1, 2, 3]
    assert [r["source_a"] for r in tiers["low"]] == ["sample1", "sample2", "sample1", "sample1"]  # tie -> sample 1
    assert {r["source_b"] for r in tiers["low"]} == {"original"}


def test_medium_first_half_for_odd_counts():
    n = 5
    tiers = build_tiers([f"p{i}" for i in range(n)], ["s"] * n, ["t"] * n, ["o"] * n, [0.0] * n, [1.0] * n, [-1.0] * n)
    assert [r["source_b"] for r in tiers["medium"]] == ["original", "original", "sample2", "sample2", "sample2"]


def test_build_tiers_checks_lengths_and_scores():
    with pytest.raises(ValueError, match="sample2"):
        build_tiers(PROMPTS, S1, S2[:3], ORIG, R1, R2, RO)
    with pytest.raises(ValueError, match="r2: non-finite oracle score at row 1"):
        build_tiers(PROMPTS, S1, S2, ORIG, R1, [0.0, np.nan, 0.0, 0.0], RO)


@pytest.mark.parametrize("gap", [-2.0, -0.5, 0.0, 1.0, 3.0])
def test_gumbel_labels_follow_bradley_terry(gap):
    n = 10_000
    rng = np.random.default_rng(123)
    r2 = rng.uniform(-3, 3, size=n)
    labels = gumbel_labels(r2 + gap, r2, np.random.default_rng(7))
    assert labels.dtype == bool and labels.shape == (n,)
    assert abs(labels.mean() - expit(gap)) < 0.02


def test_gumbel_labels_seeded():
    r1, r2 = np.linspace(-3, 3, 50), np.zeros(50)
    a = gumbel_labels(r1, r2, np.random.default_rng(42))
    b = gumbel_labels(r1, r2, np.random.default_rng(42))
    c = gumbel_labels(r1, r2, np.random.default_rng(43))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="equal length"):
        gumbel_labels(r1, r2[:3], np.random.default_rng(0))


def _synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    r1, r2 = rng.uniform(-3, 3, n), rng.uniform(-3, 3, n)
    ro = rng.uniform(-3, -1, n)
    return build_tiers(
        [f"p{i}" for i in range(n)],
        [f"s1-{i}" for i in range(n)],
        [f"s2-{i}" for i in range(n)],
        [f"o-{i}" for i in range(n)],
        r1,
        r2,
        ro,
    )


def test_splits_rows_labels_and_reproducibility():
    tiers = _synthetic(200)
    splits, report = make_preference_splits(tiers, n_train=150, n_eval=40, shuffle_seed=1, label_seed=42)
    again, _ = make_preference_splits(tiers, n_train=150, n_eval=40, shuffle_seed=1, label_seed=42)
    other, _ = make_preference_splits(tiers, n_train=150, n_eval=40, shuffle_seed=2, label_seed=42)
    assert splits == again and splits != other
    for tier in ("high", "medium", "low"):
        train, ev = splits[tier]["train"], splits[tier]["eval"]
        assert len(train) == 150 and len(ev) == 40
        assert not {r["prompt_index"] for r in train} & {r["prompt_index"] for r in ev}
        for row in train + ev:
            assert set(row) >= {
                "prompt",
                "chosen",
                "rejected",
                "oracle_chosen",
                "oracle_rejected",
                "label_agrees_with_oracle",
            }
            assert row["label_agrees_with_oracle"] == (row["oracle_chosen"] >= row["oracle_rejected"])
            assert row["prompt"] == f"p{row['prompt_index']}" and row["tier"] == tier
            assert row["chosen"] != row["rejected"]
        assert report["tiers"][tier]["train"]["n"] == 150
    # one shared permutation: every tier has the same train and eval prompts, in the same order
    order = [r["prompt_index"] for r in splits["high"]["eval"]]
    assert (
        order
        == [r["prompt_index"] for r in splits["low"]["eval"]]
        == [r["prompt_index"] for r in splits["medium"]["eval"]]
    )
    assert order != sorted(order)  # shuffled
    # low pairs (best sample vs original) have larger gaps and far fewer noisy labels than high pairs
    low, high = report["tiers"]["low"]["train"], report["tiers"]["high"]["train"]
    assert low["mean_abs_oracle_gap"] > high["mean_abs_oracle_gap"]
    assert low["frac_disagree"] < high["frac_disagree"]


def test_default_train_is_the_rest():
    splits, report = make_preference_splits(_synthetic(30), n_eval=10)
    assert len(splits["high"]["train"]) == 20 and len(splits["high"]["eval"]) == 10
    with pytest.raises(ValueError, match="must fit"):
        make_preference_splits(_synthetic(30), n_train=25, n_eval=10)


def test_labels_are_the_gumbel_labels_of_the_shuffled_rows():
    tiers = _synthetic(64)
    splits, report = make_preference_splits(tiers, n_eval=0, shuffle_seed=5, label_seed=9)
    order = np.random.default_rng(5).permutation(64)
    rows = [tiers["high"][i] for i in order]
    labels = gumbel_labels([r["oracle_a"] for r in rows], [r["oracle_b"] for r in rows], np.random.default_rng(9))
    chosen = [r["text_a"] if y else r["text_b"] for r, y in zip(rows, labels, strict=True)]
    assert [r["chosen"] for r in splits["high"]["train"]] == chosen
    assert report["tiers"]["high"]["n_first_preferred"] == int(labels.sum())


def test_identical_pairs_are_dropped_and_counted():
    n = 10
    s1 = [f"x{i}" for i in range(n)]
    s2 = list(s1)
    s2[3] = "different"  # only rows 3 differ in the high tier
    tiers = build_tiers(
        [f"p{i}" for i in range(n)], s1, s2, ["x0"] + [f"o{i}" for i in range(1, n)], [0.0] * n, [-1.0] * n, [-2.0] * n
    )
    splits, report = make_preference_splits(tiers, n_eval=4, shuffle_seed=0)
    high = report["tiers"]["high"]
    assert high["train"]["dropped_identical"] + high["eval"]["dropped_identical"] == 9
    assert len(splits["high"]["train"]) + len(splits["high"]["eval"]) == 1
    # low: row 0's best sample "x0" equals its original "x0"
    low = report["tiers"]["low"]
    assert low["train"]["dropped_identical"] + low["eval"]["dropped_identical"] == 1
    assert len(splits["low"]["train"]) + len(splits["low"]["eval"]) == 9


def test_label_noise_stats_values():
    rows = [
        {"oracle_chosen": 1.0, "oracle_rejected": -1.0, "label_agrees_with_oracle": True, "chosen_source": "sample1"},
        {"oracle_chosen": -0.5, "oracle_rejected": 0.5, "label_agrees_with_oracle": False, "chosen_source": "original"},
        {"oracle_chosen": 2.0, "oracle_rejected": 2.0, "label_agrees_with_oracle": True, "chosen_source": "sample1"},
        {"oracle_chosen": 0.0, "oracle_rejected": -3.0, "label_agrees_with_oracle": True, "chosen_source": "sample2"},
    ]
    stats = label_noise_stats(rows)
    assert stats["n"] == 4 and stats["n_disagree"] == 1 and stats["frac_disagree"] == 0.25
    assert stats["mean_abs_oracle_gap"] == pytest.approx((2 + 1 + 0 + 3) / 4)
    assert stats["chosen_source_counts"] == {"original": 1, "sample1": 2, "sample2": 1}
    assert label_noise_stats([])["frac_disagree"] is None


def test_noise_rate_matches_bradley_terry():
    # with many rows, the fraction of labels against the oracle equals E[σ(−|gap|)]
    n = 4000
    tiers = _synthetic(n, seed=3)
    splits, _ = make_preference_splits(tiers, n_eval=0)
    rows = splits["high"]["train"]
    gaps = np.abs([r["oracle_chosen"] - r["oracle_rejected"] for r in rows])
    expected = expit(-gaps).mean()
    assert abs(label_noise_stats(rows)["frac_disagree"] - expected) < 0.02
