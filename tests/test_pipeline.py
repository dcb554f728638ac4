"""The offline IMDB pipeline end to end at toy size (configs/pipeline/ci.yaml), in-process: artifacts, caching,
resumption of an interrupted stage, and bad input stopping with an error that names the stage and the row."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from madpo.losses import MADPOLoss
from madpo.pipeline import run, stages
from madpo.pipeline.config import PipelineConfig
from tests.conftest import REPO, TINY_LLAMA

CI = str(REPO / "configs" / "pipeline" / "ci.yaml")
pytestmark = pytest.mark.slow


def ci_args(out: Path, *extra: str) -> list[str]:
    return ["-c", CI, "--output_dir", str(out), "--trainer.progress_bar", "false", *extra]


def stage_dirs(out: Path, label: str) -> list[Path]:
    return sorted(
        p for p in out.iterdir() if p.is_dir() and re.fullmatch(rf"{re.escape(label)}-[0-9a-f]{{12}}", p.name)
    )


def only_stage(out: Path, label: str) -> Path:
    dirs = stage_dirs(out, label)
    assert len(dirs) == 1, (label, dirs)
    return dirs[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    """One complete CI pipeline run: (output_dir, summary, seconds)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    start = time.perf_counter()
    summary = run.main(ci_args(out))
    return out, summary, time.perf_counter() - start


def copy_of(finished: tuple[Path, dict, float], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def test_artifacts(finished: tuple[Path, dict, float]) -> None:
    out, summary, _ = finished
    cfg = run.parse_config(ci_args(out))
    n_prompts, n_eval = cfg.data.n_prompts, cfg.pairs.n_eval
    n_train = n_prompts - n_eval
    pairs_dir = only_stage(out, "pairs")
    report = json.loads((pairs_dir / "report.json").read_text())
    assert report["n_rows"] == n_prompts and report["n_train_rows"] == n_train and report["n_eval_rows"] == n_eval
    for tier in ("high", "medium", "low"):
        for split, n_expected in (("train", n_train), ("eval", n_eval)):
            rows = [
                json.loads(line) for line in (pairs_dir / "pairs" / tier / f"{split}.jsonl").read_text().splitlines()
            ]
            entry = report["tiers"][tier][split]
            # dataset columns and sizes: TRL format + oracle columns; dropped pairs are counted, never silent
            assert {"prompt", "chosen", "rejected", "oracle_chosen", "oracle_rejected", "prompt_index"} <= set(rows[0])
            assert len(rows) == entry["n"] == n_expected - entry["dropped_identical"] - entry["dropped_empty"]
            assert all(r["chosen"] != r["rejected"] and r["chosen"].strip() and r["rejected"].strip() for r in rows)
            # label noise statistics
            for key in ("n_disagree", "frac_disagree", "mean_abs_oracle_gap", "chosen_source_counts"):
                assert entry[key] is not None, (tier, split, key)
            assert entry["n_disagree"] == sum(r["oracle_chosen"] < r["oracle_rejected"] for r in rows)
            # tier composition: high = two samples; low = best sample vs the original; medium = low on the first half
            for r in rows:
                has_original = "original" in (r["chosen_source"], r["rejected_source"])
                expected = {"high": False, "low": True, "medium": r["prompt_index"] < n_prompts // 2}[tier]
                assert has_original == expected, (tier, r)
            scores = np.array([[r["oracle_chosen"], r["oracle_rejected"]] for r in rows])
            assert np.all(np.abs(scores) <= 3.0)
    assert report["tiers"]["high"]["train"]["composition"] == {
        "sample vs sample": report["tiers"]["high"]["train"]["n"]
    }
    assert "identical_sample_pairs" in report and report["generation"]["n_sequences"] == 2 * n_prompts

    # metrics present and in the oracle's range
    rows = {r["model"].split()[0]: r for r in summary["rows"]}
    assert set(rows) == {"SFT", "madpo"}
    for r in rows.values():
        assert -3.0 <= r["ci95_low"] <= r["mean"] <= r["ci95_high"] <= 3.0
        assert r["se"] > 0 and r["n"] == cfg.n_eval_prompts
    assert rows["SFT"]["kl"] == 0.0 and np.isfinite(rows["madpo"]["kl"])
    evaluation = json.loads((only_stage(out, "evaluate-madpo-high-s0") / "results.json").read_text())
    assert evaluation["examples"] and all(-3 <= e["reward"] <= 3 for e in evaluation["examples"])
    assert 0.5 < summary["oracle"]["heldout_accuracy"] <= 1.0 and summary["oracle"]["snippet_accuracy"] is not None
    assert (out / "results.md").read_text().startswith("# MADPO offline IMDB pipeline")
    assert json.loads((out / "results.json").read_text())["rows"][0]["model"] == "SFT (reference)"
    # manifests, exported models, TensorBoard logs
    for label in (
        "reviews",
        "tokenizer",
        "oracle",
        "base_model",
        "sft",
        "pairs",
        "reward-high",
        "policy-madpo-high-s0",
    ):
        manifest = json.loads((only_stage(out, label) / "stage.json").read_text())
        assert manifest["seconds"] >= 0 and manifest["key"] in only_stage(out, label).name
    for label in ("base_model", "sft", "reward-high", "policy-madpo-high-s0"):
        assert (only_stage(out, label) / "model" / "config.json").is_file()
        assert list((only_stage(out, label) / "tensorboard").rglob("events.out.tfevents.*"))
    assert list((only_stage(out, "evaluate-madpo-high-s0") / "tensorboard").rglob("events.out.tfevents.*"))
    policy = json.loads((only_stage(out, "policy-madpo-high-s0") / "stage.json").read_text())
    assert policy["stats"]["data"]["train"]["rm_margin"]["source"].startswith("reward_model=")
    # the reward model validated during training and exported its best weights (val every 2 steps, 2 epochs x 4)
    reward = json.loads((only_stage(out, "reward-high") / "stage.json").read_text())["stats"]
    assert reward["best_step"] in range(2, reward["global_step"] + 1, 2)
    assert reward["metrics"]["val/loss"] <= reward["last_val_metrics"]["val/loss"]
    # its quality against the known label model, beside the TF-IDF reference, in the stats and the results page
    assert reward["quality"]["n"] == reward["tfidf_reference"]["n"] == reward["n_val"]
    assert "Reward-model quality on those pairs" in summary["markdown"]


def test_second_run_is_all_cached_and_fast(finished: tuple[Path, dict, float], capsys: pytest.CaptureFixture) -> None:
    out, _, first_seconds = finished
    capsys.readouterr()
    start = time.perf_counter()
    summary = run.main(ci_args(out))
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert all(s["cached"] for s in summary["stages"]), summary["stages"]
    assert len(summary["stages"]) == 10
    assert "running" not in printed and printed.count(": cached (") == 10
    assert seconds < max(10.0, first_seconds / 3), (seconds, first_seconds)


def test_interrupted_stage_is_redone_upstream_stays_cached(
    finished: tuple[Path, dict, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = copy_of(finished, tmp_path)
    policy_dir = only_stage(out, "policy-madpo-high-s0")
    (policy_dir / "stage.json").unlink()  # killed before its manifest was written

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash inside training")

    monkeypatch.setattr(stages.training, "fit", crash)
    with pytest.raises(stages.StageError, match=r"^stage policy: \[policy-madpo-high-s0\] simulated crash"):
        run.main(ci_args(out))
    assert policy_dir.is_dir() and not (policy_dir / "stage.json").exists()
    monkeypatch.undo()

    capsys.readouterr()
    summary = run.main(ci_args(out))
    printed = capsys.readouterr().out
    assert "has no stage.json (an interrupted run): redoing it" in printed
    by_label = {s["label"]: s for s in summary["stages"]}
    assert not by_label["policy-madpo-high-s0"]["cached"]
    for label in ("reviews", "tokenizer", "oracle", "base_model", "sft", "pairs", "reward-high", "evaluate-sft"):
        assert by_label[label]["cached"], label
    assert (policy_dir / "stage.json").is_file() and (policy_dir / "model" / "config.json").is_file()


def test_another_method_reuses_upstream(finished: tuple[Path, dict, float], tmp_path: Path) -> None:
    out = copy_of(finished, tmp_path)
    summary = run.main(ci_args(out, "--policy.method", "dpo"))
    by_label = {s["label"]: s for s in summary["stages"]}
    assert "reward-high" not in by_label  # DPO reads no reward model
    assert not by_label["policy-dpo-high-s0"]["cached"] and not by_label["evaluate-dpo-high-s0"]["cached"]
    for label in ("reviews", "tokenizer", "oracle", "base_model", "sft", "pairs", "evaluate-sft"):
        assert by_label[label]["cached"], label
    assert [r["model"] for r in summary["rows"]] == ["SFT (reference)", "dpo (tier high, seed 0)"]


class NanOracle:
    name = "nan-oracle"

    def score(self, texts: list[str]) -> np.ndarray:
        out = np.zeros(len(texts))
        out[3] = np.nan
        return out

    def describe(self) -> dict:
        return {"name": self.name}


def test_oracle_returning_nan_stops_the_pairs_stage_naming_the_row(
    finished: tuple[Path, dict, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_of(finished, tmp_path)
    monkeypatch.setattr(stages.oracle, "load_oracle", lambda *a, **k: NanOracle())
    with pytest.raises(stages.StageError, match=r"^stage pairs: .*non-finite score.*row 3 ") as info:
        run.main(ci_args(out, "--pairs.seed", "7"))  # a new pairs stage on the cached upstream
    assert "sample1" in str(info.value)
    assert len(stage_dirs(out, "pairs")) == 2
    unfinished = [p for p in stage_dirs(out, "pairs") if not (p / "stage.json").exists()]
    assert len(unfinished) == 1  # left without a manifest: redone next time


def test_bad_config_and_empty_slices_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^config: pairs.n_eval=0"):
        run.main(ci_args(tmp_path / "a", "--pairs.n_eval", "0"))
    with pytest.raises(ValueError, match=r"^config: .*policy.method='sgd'"):
        run.main(ci_args(tmp_path / "b", "--policy.method", "sgd"))
    with pytest.raises(stages.StageError, match=r"^stage reviews: the sft slice is empty"):
        run.main(ci_args(tmp_path / "c", "--data.n_sft", "0"))


def test_prompt_longer_than_the_budget_names_the_row() -> None:
    from madpo.modeling import load_tokenizer

    tok = load_tokenizer(TINY_LLAMA)
    stages.check_prompt_lengths(["short", "a b"], tok, 64, "pairs/high/train")
    with pytest.raises(ValueError, match=r"pairs/high/train row 1: the prompt has \d+ tokens"):
        stages.check_prompt_lengths(["short", "word " * 100], tok, 16, "pairs/high/train")


def test_flags_override_the_yaml_and_stage_keys_follow_their_inputs(tmp_path: Path) -> None:
    cfg = run.parse_config(ci_args(tmp_path, "--policy.method", "madpo_no_amplify", "--policy.tier", "low"))
    assert isinstance(cfg, PipelineConfig)
    assert (cfg.policy.name, type(cfg.policy.loss), cfg.policy.loss.variant) == (
        "madpo_no_amplify",
        MADPOLoss,
        "no_amplify",
    )
    assert cfg.data.n_prompts == 96 and cfg.policy.tier == "low"
    up = stages.StageResult("sft", "sft", tmp_path, "abc", {}, cached=True)
    assert stages.stage_key("policy", {"beta": 0.1}, [up]) == stages.stage_key("policy", {"beta": 0.1}, [up])
    assert stages.stage_key("policy", {"beta": 0.1}, [up]) != stages.stage_key("policy", {"beta": 0.2}, [up])
    other = stages.StageResult("sft", "sft", tmp_path, "abd", {}, cached=True)
    assert stages.stage_key("policy", {"beta": 0.1}, [up]) != stages.stage_key("policy", {"beta": 0.1}, [other])


def _reproduce_module(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    from tests.helpers import load_bench_script

    return load_bench_script("reproduce", monkeypatch)


def test_bench_reproduce_smoke(
    finished: tuple[Path, dict, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/reproduce.py on the cached CI stages: one table cell, a 1-point frontier and a 2-level robustness sweep;
    every report is written, and the cells it shares with the pipeline run come from the cache."""
    reproduce = _reproduce_module(monkeypatch)
    out = copy_of(finished, tmp_path)
    results = tmp_path / "results"
    methods = "madpo,dpo,madpo_amp_only,madpo_reg_only"
    args = ["--methods", methods, "--tiers", "high", "--seeds", "0", "--results-dir", str(results)]
    args += ["--cells-dir", str(tmp_path / "cells")]
    args += ["--frontier", "--frontier-grid", "0.1", "--robustness", "--noise-std", "0", "--flip-fraction", "0.5"]
    written = reproduce.main([*args, *ci_args(out)])
    assert set(written) == {"table", "frontier", "robustness"}
    table = (results / "imdb-offline.md").read_text()
    assert "| madpo |" in table and "| dpo |" in table and "2.23" in table  # the paper's number beside ours
    assert "MADPO against the next best baseline" in table and "reward model's margins" in table
    cells = {c["method"]: c for c in json.loads((results / "imdb-offline.json").read_text())["cells"]}
    assert set(cells) == {"madpo", "dpo", "madpo_amp_only", "madpo_reg_only"}
    assert cells["madpo"]["cached"]  # the pipeline's own MADPO run
    # no margin of the toy reward model reaches ±τ: amp-only is MADPO's run and reg-only DPO's, said in the table
    assert cells["madpo_amp_only"]["policy_stage"] == cells["madpo"]["policy_stage"]
    assert cells["madpo_reg_only"]["policy_stage"] == cells["dpo"]["policy_stage"]
    assert cells["madpo_reg_only"]["mean"] == cells["dpo"]["mean"]
    assert cells["madpo_reg_only"]["extra"]["max_abs_margin"] < 6.9 - 0.5
    assert "madpo_reg_only on high is the dpo run of the same seed" in table and "0% at or beyond ±τ" in table
    down = json.loads((results / "imdb-offline.json").read_text())["downweighted"]["high"]
    assert 0 <= down["frac"] <= 1 and down["original_pos"] == 0.0  # the high tier never holds the original review
    assert 0 <= down["label_right_pos"] <= 1 and down["w_pos"] >= 1.0  # w ≥ 1 wherever m ≥ 0 (and |m| < τ)
    assert "What the down-weighting acts on" in table
    assert not stage_dirs(out, "policy-madpo_reg_only-high-s0")
    assert (results / "reward_kl_frontier.png").stat().st_size > 0
    robust = (results / "robustness.md").read_text()
    assert "| 0 | 50% |" in robust and "| 0 | 0% |" in robust


def test_bench_reproduce_jobs_split_the_cells_between_workers(
    finished: tuple[Path, dict, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--jobs 2: two worker processes run the new cells (each once) and store them, then the reports come from the
    store."""
    reproduce = _reproduce_module(monkeypatch)
    out = copy_of(finished, tmp_path)
    results, store = tmp_path / "results", tmp_path / "cells"
    args = ["--methods", "dpo,ipo", "--tiers", "high", "--seeds", "0,1", "--jobs", "2", "--results-dir", str(results)]
    args += ["--cells-dir", str(store)]
    written = reproduce.main([*args, *ci_args(out, "--trainer.num_threads", "2")])
    assert set(written) == {"table"}
    cells = json.loads((results / "imdb-offline.json").read_text())["cells"]
    assert sorted((c["method"], c["seed"]) for c in cells) == [("dpo", 0), ("dpo", 1), ("ipo", 0), ("ipo", 1)]
    for label in ("policy-dpo-high-s1", "policy-ipo-high-s0", "policy-ipo-high-s1"):
        assert len(stage_dirs(out, label)) == 1  # each cell ran once, in one worker
    assert len(list(store.glob("policy-*.json"))) == 4  # every cell stored, by the worker that ran it


def test_bench_oracle_reference_on_the_cached_stages(
    finished: tuple[Path, dict, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """bench/oracle_reference.py trains no stage, scores the eval pairs past reward.n_val, and its labels row is the
    pairs' own label noise against the pipeline's oracle."""
    from tests.helpers import load_bench_script

    bench = load_bench_script("oracle_reference", monkeypatch)
    out = copy_of(finished, tmp_path)
    cfg = run.parse_config(ci_args(out))
    capsys.readouterr()
    args = ["--tiers", "high", "--reference-train", "1500", "--accuracy-reviews", "400"]
    args += ["--results-dir", str(tmp_path / "results")]
    doc = bench.main([*args, *ci_args(out)])
    assert "running" not in capsys.readouterr().out  # every stage came from the cache
    rows = [
        json.loads(line)
        for line in (only_stage(out, "pairs") / "pairs" / "high" / "eval.jsonl").read_text().splitlines()
    ][cfg.reward.n_val :]
    tier = doc["tiers"]["high"]
    assert tier["n_pairs"] == len(rows) > 0
    gaps = np.array([r["oracle_chosen"] - r["oracle_rejected"] for r in rows])
    labels = tier["table"]["labels"]["pipeline oracle"]
    assert labels["agreement"] == pytest.approx((gaps[gaps != 0] > 0).mean())
    assert set(tier["table"]["reward model"]) == {"pipeline oracle", "reference oracle", "VADER"}
    assert "pipeline oracle" not in tier["table"]["pipeline oracle"]  # no truth is scored against itself
    accuracy = doc["oracle_accuracy"]
    assert accuracy["pipeline oracle"]["n_train"] == cfg.data.n_oracle_train
    assert accuracy["reference oracle"]["n_train"] == 1500 and accuracy["VADER"]["n_train"] is None
    assert all(0.5 < a["full"] <= 1 and a["n"] == 400 for a in accuracy.values())
    assert "| reward model |" in (tmp_path / "results" / "oracle_reference.md").read_text()


def test_pretrained_base_with_lora_the_paper_path(tmp_path: Path) -> None:
    """configs/imdb/paper.yaml's code path on a local model: no tokenizer training or LM pretraining (the base is
    given), LoRA for SFT / reward / policy, SFT and policy exported merged (plain transformers dirs)."""
    lora = '{"r": 4, "alpha": 8}'
    out = tmp_path / "run"
    summary = run.main(
        ci_args(out, "--base_model.name_or_path", TINY_LLAMA, "--sft.lora", lora, "--reward.lora", lora)
        + ["--policy.lora", lora]
    )
    base = json.loads((only_stage(out, "base_model") / "stage.json").read_text())
    assert base["outputs"]["model"] == TINY_LLAMA and base["stats"] == {"pretrained": TINY_LLAMA}
    for label in ("sft", "policy-madpo-high-s0"):
        config = json.loads((only_stage(out, label) / "model" / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]  # merged: loads without peft
        assert not (only_stage(out, label) / "model" / "adapter_config.json").exists()
    assert summary["intervals_separated"] in (True, False) and len(summary["rows"]) == 2
