"""`policy.margin_source`: synthetic MADPO margins of a known quality (madpo.pipeline.margins.synthetic_margins) in
place of the reward model's, the policy stage that reads them without any reward model, and bench/rm_quality_curve.py,
which measures MADPO − DPO against their quality and resumes from its stored cells."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from madpo.pipeline import run, stages
from madpo.pipeline.config import PolicyConfig
from madpo.pipeline.margins import synthetic_margins
from madpo.pipeline.stages.base import _canonical
from tests.conftest import REPO

CI = str(REPO / "configs" / "pipeline" / "ci.yaml")
N = 20_000
GAPS = np.random.default_rng(3).uniform(-2.0, 3.0, N)  # not normal, not centred: the sources must not assume it


def ci_args(out: Path, *extra: str) -> list[str]:
    return ["-c", CI, "--output_dir", str(out), "--trainer.progress_bar", "false", *extra]


# ---- synthetic_margins --------------------------------------------------------------------------------------------


def test_oracle_source_without_noise_is_the_gaps_exactly() -> None:
    m, stats = synthetic_margins(GAPS, source="oracle", noise_std=0.0, seed=0)
    assert m.dtype == np.float64 and np.array_equal(m, GAPS) and m is not GAPS
    assert stats["source"] == "oracle" and stats["noise_std"] == 0.0 and stats["n"] == N
    assert np.array_equal(synthetic_margins(GAPS.tolist(), source="oracle", noise_std=0.0, seed=9)[0], GAPS)


def test_oracle_noise_is_seeded_and_has_the_requested_sd() -> None:
    sigma = 1.5
    m, _ = synthetic_margins(GAPS, source="oracle", noise_std=sigma, seed=0)
    noise = m - GAPS
    # the sample sd of n normals has SE σ/√(2n): 5 SEs is a bound a correct sampler misses about once in 10^6
    assert abs(noise.std() - sigma) < 5 * sigma / math.sqrt(2 * N)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(N)
    assert np.array_equal(synthetic_margins(GAPS, source="oracle", noise_std=sigma, seed=0)[0], m)
    assert not np.allclose(synthetic_margins(GAPS, source="oracle", noise_std=sigma, seed=1)[0], m)
    # another stream of the same run (the validation split) draws other noise
    assert not np.allclose(synthetic_margins(GAPS, source="oracle", noise_std=sigma, seed=0, stream=1)[0], m)
    # a negative seed is a seed like another
    assert not np.allclose(synthetic_margins(GAPS, source="oracle", noise_std=sigma, seed=-1)[0], m)


def test_random_source_is_independent_of_the_gaps_and_on_their_scale() -> None:
    m, stats = synthetic_margins(GAPS, source="random", noise_std=0.0, seed=0)
    s = GAPS.std()
    assert stats["scale"] == pytest.approx(s)
    assert abs(np.corrcoef(m, GAPS)[0, 1]) < 4 / math.sqrt(N)  # independent: corr ~ N(0, 1/n)
    assert abs(m.std() - s) < 5 * s / math.sqrt(2 * N) and abs(m.mean()) < 5 * s / math.sqrt(N)
    assert np.array_equal(synthetic_margins(GAPS, source="random", noise_std=0.0, seed=0)[0], m)
    assert not np.allclose(synthetic_margins(GAPS, source="random", noise_std=0.0, seed=1)[0], m)
    # an explicit scale (validation reuses the training gaps' sd) replaces the gaps' own
    scaled, stats = synthetic_margins(GAPS[:10], source="random", noise_std=0.0, seed=0, scale=2.0)
    assert stats["scale"] == 2.0 and np.allclose(
        scaled, 2.0 * synthetic_margins(GAPS[:10], source="random", noise_std=0.0, seed=0, scale=1.0)[0]
    )


def test_synthetic_margins_refuse_what_they_cannot_mean() -> None:
    with pytest.raises(ValueError, match="source='bogus'"):
        synthetic_margins(GAPS, source="bogus", noise_std=0.0, seed=0)
    with pytest.raises(ValueError, match="noise_std"):
        synthetic_margins(GAPS, source="oracle", noise_std=-1.0, seed=0)
    with pytest.raises(ValueError, match="noise_std"):
        synthetic_margins(GAPS, source="random", noise_std=1.0, seed=0)  # random margins have no noise level
    with pytest.raises(ValueError, match="not finite"):
        synthetic_margins([0.0, float("nan")], source="oracle", noise_std=0.0, seed=0)
    m, stats = synthetic_margins([], source="random", noise_std=0.0, seed=0)
    assert m.shape == (0,) and stats["n"] == 0


# ---- PolicyConfig and the stage key ---------------------------------------------------------------------------------


def test_an_unknown_source_fails_validation_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"policy\.margin_source='rm': expected one of \['reward_model', 'oracle'"):
        PolicyConfig(margin_source="rm")
    with pytest.raises(ValueError, match="margin_source_noise_std=-1.0 must be >= 0"):
        PolicyConfig(margin_source="oracle", margin_source_noise_std=-1.0)
    with pytest.raises(ValueError, match="applies to margin_source=oracle only"):
        PolicyConfig(margin_source_noise_std=1.0)
    with pytest.raises(ValueError, match="policy.margin_source='bogus'"):
        run.parse_config(ci_args(Path("unused"), "--policy.margin_source", "bogus"))
    cfg = run.parse_config(ci_args(Path("unused"), "--policy.margin_source", "oracle"))
    assert cfg.policy.margin_source == "oracle" and not cfg.policy.needs_reward_model and cfg.policy.uses_margins


def _inputs(tmp_path: Path, policy: PolicyConfig) -> stages.PolicyInputs:
    up = stages.StageResult("x", "x", tmp_path, "abc", {}, cached=True)
    reward = up if policy.needs_reward_model else None
    return stages.PolicyInputs.of(
        policy, (16, 64), stages.TrainingSettings.of(run.PipelineConfig().trainer), up, up, reward
    )


def test_the_key_covers_the_source_and_its_sigma_and_keeps_reward_model_keys(tmp_path: Path) -> None:
    madpo = PolicyConfig(method="madpo")
    oracle = dataclasses.replace(madpo, margin_source="oracle")
    keys = {
        "rm": _inputs(tmp_path, madpo).key,
        "oracle0": _inputs(tmp_path, oracle).key,
        "oracle1": _inputs(tmp_path, dataclasses.replace(oracle, margin_source_noise_std=1.0)).key,
        "random": _inputs(tmp_path, dataclasses.replace(madpo, margin_source="random")).key,
    }
    assert len(set(keys.values())) == 4
    # a reward-model run's margins hold what they held before the synthetic sources: its cached stage is still found
    assert set(_canonical(_inputs(tmp_path, madpo).margins)) == {"reward", "noise_std", "flip_fraction"}
    synthetic = _inputs(tmp_path, oracle).margins
    assert isinstance(synthetic, stages.policy.SyntheticMargins) and synthetic.reward is None
    assert _inputs(tmp_path, oracle).upstream() == _inputs(tmp_path, PolicyConfig(method="dpo")).upstream()
    # DPO reads no margins: a margin source changes nothing of its run
    dpo = PolicyConfig(method="dpo")
    assert _inputs(tmp_path, dataclasses.replace(dpo, margin_source="oracle")).key == _inputs(tmp_path, dpo).key
    with pytest.raises(stages.StageError, match="needs the tier's reward model"):
        stages.PolicyInputs.of(
            madpo,
            (16, 64),
            stages.TrainingSettings.of(run.PipelineConfig().trainer),
            *[stages.StageResult("x", "x", tmp_path, "abc", {}, cached=True)] * 2,
            None,
        )
    assert stages.policy_label(oracle) == "policy-madpo-high-s0-oracle-sd0"
    assert stages.policy_label(dataclasses.replace(oracle, margin_source_noise_std=0.5)).endswith("-oracle-sd0.5")
    assert stages.policy_label(dataclasses.replace(madpo, margin_source="random")).endswith("-s0-random")
    assert stages.policy_label(madpo) == "policy-madpo-high-s0"
    assert stages.policy_label(dataclasses.replace(dpo, margin_source="random")) == "policy-dpo-high-s0"


# ---- the policy stage on the tiny pipeline --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CI pipeline up to the pairs (no reward model): the stage cache the tests below copy."""
    out = tmp_path_factory.mktemp("margin-source") / "run"
    run.main(ci_args(out, "--stop_after", "pairs"))
    return out


@pytest.mark.slow
def test_the_oracle_source_trains_madpo_without_a_reward_model(
    upstream: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    shutil.copytree(upstream, out)

    def no_reward(self: stages.Pipeline, tier: str) -> stages.StageResult:
        raise AssertionError(f"the reward model of tier {tier} was asked for")

    monkeypatch.setattr(stages.Pipeline, "reward", no_reward)
    cfg = run.parse_config(ci_args(out, "--policy.margin_source", "oracle"))
    pipe = stages.Pipeline(cfg)
    result = pipe.policy()
    assert result.label == "policy-madpo-high-s0-oracle-sd0" and not result.cached
    assert not list(out.glob("reward-*"))
    stats = result.stats
    assert stats["data"]["train"]["rm_margin"]["source"] == "oracle"
    assert stats["data"]["val"]["rm_margin"]["source"] == "oracle"
    # σ = 0: the margins the loss read are the oracle gaps, so their BT loss is the Bayes loss and they always agree
    quality = stats["margin_quality"]
    assert quality["n"] == stats["margins"]["n"] > 0
    assert quality["bt_excess"] == 0.0 and quality["oracle_agreement"] == 1.0
    assert quality["corr"] == pytest.approx(1.0) and stats["margins"]["corr_with_oracle_gap"] == pytest.approx(1.0)
    # another σ is another stage, keyed apart (found by key, not trained here)
    noisy = dataclasses.replace(cfg.policy, margin_source_noise_std=1.0)
    noisy_inputs = stages.PolicyInputs.of(noisy, pipe.lengths, pipe.training, pipe.sft(), pipe.pairs(), None)
    assert noisy_inputs.key != result.key
    # the random source runs too, and its quality is at chance on this tiny sample's scale
    rnd = pipe.policy(dataclasses.replace(cfg.policy, margin_source="random"))
    assert rnd.label.endswith("-random") and rnd.stats["margin_quality"]["bt_excess"] > 0


# ---- bench/rm_quality_curve.py --------------------------------------------------------------------------------------


@pytest.fixture
def curve(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    from tests.helpers import load_bench_script

    return load_bench_script("rm_quality_curve", monkeypatch)


class Bypassed(Exception):
    """Raised by the spy once the curve script has built a pipeline: it would train."""


@pytest.mark.slow
def test_curve_runs_stores_its_cells_and_a_rerun_reads_them_and_trains_nothing(
    curve, upstream: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cells, results = tmp_path / "run", tmp_path / "cells", tmp_path / "results"
    shutil.copytree(upstream, out)
    args = ["--tiers", "high", "--seeds", "0", "--levels", "0,random", "--cells-dir", str(cells)]
    args += ["--results-dir", str(results), *ci_args(out)]
    paths = curve.main(args)
    md = paths["md"].read_text()
    assert md.startswith("# Reward-quality curve") and "`python bench/rm_quality_curve.py --tiers high" in md
    assert paths["png"].stat().st_size > 0
    report = json.loads(paths["json"].read_text())
    rows = {r["level"]: r for r in report["rows"]}
    assert set(rows) == {"0", "random", "reward_model"}  # the trained reward model is a point of the curve
    assert rows["0"]["bt_excess"] == 0.0 and rows["0"]["oracle_agreement"] == 1.0
    assert rows["random"]["bt_excess"] > 0
    for r in rows.values():
        d = r["d_reward"]
        assert d["lo"] <= d["mean"] <= d["hi"] and d["ci"] == "within run"
        assert d["mean"] == pytest.approx(r["madpo_reward"] - r["dpo_reward"])
    assert len(list(cells.glob("*.json"))) == 4  # DPO, two levels, the reward model
    inputs = {c["level"]: c["result"]["cell"]["inputs"] for c in report["cells"]}
    assert len({i["build"] for i in inputs.values()}) == 1  # one machine, one build of the SFT model and pairs
    assert inputs["reward_model"]["margins"] and inputs["0"]["margins"] is None  # only the RM point reads RM margins
    assert len(list(out.glob("reward-high-*"))) == 1 and len(list(out.glob("policy-dpo-high-s0-*"))) == 1

    # a rerun with no stage cache at all (another machine): every cell comes from the store, no stage is built
    shutil.rmtree(out)
    built = []
    real_pipeline = curve.Pipeline

    def spy(cfg):  # noqa: ANN001, ANN202
        built.append(real_pipeline(cfg))
        raise Bypassed

    monkeypatch.setattr(curve, "Pipeline", spy)
    again = curve.main(args)
    assert not built and not out.exists()
    assert json.loads(again["json"].read_text())["rows"] == report["rows"]

    # the same check with the store bypassed: the script builds the pipeline (and its cache dir) to train again
    monkeypatch.setattr(curve.CellStore, "get", lambda self, spec: None)
    with pytest.raises(Bypassed):
        curve.main(args)
    assert built and out.exists()


def test_curve_plan_pairs_every_madpo_level_with_one_dpo_run(curve) -> None:
    cfg = run.parse_config(["-c", CI])
    opts = curve.curve_parser().parse_args(["--tiers", "high,low", "--seeds", "0,1", "--levels", "0,0.50,random"])
    planned = curve.plan(opts, cfg)
    assert len(planned) == 2 * 2 * (1 + 3 + 1)
    levels = {(p.policy.tier, p.policy.seed, p.level): p.policy for p in planned}
    assert levels[("low", 1, "dpo")].method == "dpo" and levels[("low", 1, "0.5")].margin_source_noise_std == 0.5
    assert levels[("high", 0, "random")].margin_source == "random"
    assert levels[("high", 0, "reward_model")].needs_reward_model
    assert len({json.dumps(p.spec, sort_keys=True) for p in planned}) == len(planned)
    with pytest.raises(SystemExit, match="neither a noise"):
        curve.parse_levels("0,rm")
    d = curve.paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.0], [(0.1, 0.1)])
    assert d["mean"] == pytest.approx(2 / 3) and d["ci"] == "t over 3 seeds" and d["lo"] < d["mean"] < d["hi"]


def test_each_reward_model_variant_is_a_point_of_its_own(curve) -> None:
    cfg = run.parse_config(["-c", CI])
    args = ["--tiers", "high", "--seeds", "0,1", "--levels", "0", "--rm-variants", "config,base_lm,minilm_rt"]
    planned = curve.plan(curve.curve_parser().parse_args(args), cfg)
    by = {(p.policy.seed, p.level): p for p in planned}
    own, base, warm = (by[(0, f"reward_model{v}")] for v in ("", ":base_lm", ":minilm_rt"))
    assert base.policy == warm.policy == own.policy and base.spec != warm.spec  # one policy run, another RM's margins
    assert warm.spec["pipeline"]["reward"]["warm_start"] == "rotten_tomatoes" and base.rm_variant == "base_lm"
    assert base.spec["pipeline"]["reward"]["backbone"] is None and own.rm_variant == "config"
    assert by[(0, "dpo")].spec["pipeline"].get("reward") is None  # DPO does not depend on the reward model
    with pytest.raises(SystemExit, match="unknown reward-model variant"):
        curve.plan(curve.curve_parser().parse_args(["--rm-variants", "nope"]), cfg)


def _curve_record(curve, level: str, seed: int, build: str, reward: float) -> tuple:
    """A stored curve cell of tier high: its plan item and result, trained on input build `build`."""
    method = "dpo" if level == "dpo" else "madpo"
    policy = PolicyConfig(method=method, tier="high", seed=seed)
    cell = curve.Cell(
        method=method, tier="high", seed=seed, mean=reward, se=0.01, sd=0.1, kl=1.0, kl_se=0.1, policy_seconds=1.0,
        eval_seconds=1.0, cached=False, policy_stage=f"policy-{level}-s{seed}", eval_stage="eval",
        inputs={"build": build, "margins": None},
    )  # fmt: skip
    result = {"level": level, "cell": dataclasses.asdict(cell), "quality": {"oracle_agreement": 1.0}}
    return curve.Planned(policy, level, {"level": level, "seed": seed}), result


@pytest.mark.parametrize("blind", [False, True], ids=["by-build", "blind-to-builds"])
def test_the_curve_pairs_madpo_with_dpo_of_its_own_seed_and_build(
    curve, blind: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 1's DPO cell was trained on another machine's rebuild of the pairs (build B) than its MADPO cell (A):
    their difference mixes MADPO's effect with the rebuild's, so Δ pairs seed 0 only and the report says so. The
    blind case (every cell one build, as before builds were recorded) shows the test sees the cross-build pair."""
    if blind:
        monkeypatch.setattr(curve, "build_of", lambda item: "one")
    records = [
        _curve_record(curve, "dpo", 0, "A", 1.0),
        _curve_record(curve, "0", 0, "A", 1.5),
        _curve_record(curve, "dpo", 1, "B", 0.2),
        _curve_record(curve, "0", 1, "A", 1.4),
    ]
    (row,) = curve.curve_rows(records)
    lost = curve.unpaired(records)
    if blind:
        assert row["seeds"] == [0, 1] and row["d_reward"]["mean"] == pytest.approx((0.5 + 1.2) / 2) and not lost
        return
    assert row["seeds"] == [0] and row["builds"] == ["A"]
    assert row["d_reward"]["mean"] == pytest.approx(0.5) and row["d_reward"]["ci"] == "within run"
    assert lost == ["high oracle + N(0, 0²) s1 (`A`)"]
