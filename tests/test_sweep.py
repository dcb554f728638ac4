"""bench/reproduce.py's sweep (bench/sweep/) against its cell store, on a fake pipeline: no model is trained, so
these run in seconds. What they pin down: stored cells are skipped; a fully stored sweep writes its reports without
constructing a pipeline (and the same check fails when the store is bypassed, so it can catch a regression);
`--pending` lists without training; `--max-cells` limits and the report says what is left; the noise-matched ε is
the tier's measured label-flip rate; the competitor rows and the "who uses the margin best" section appear."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from madpo.losses import CDPOLoss, MADPOLoss, RDPOLoss
from madpo.pipeline.config import PipelineConfig, PolicyConfig
from madpo.pipeline.run import parse_config
from madpo.pipeline.stages import StageResult, policy_label, write_jsonl
from tests.conftest import REPO
from tests.helpers import load_bench_script

CI = str(REPO / "configs" / "pipeline" / "ci.yaml")
FRAC_DISAGREE = {"high": 0.31, "medium": 0.22, "low": 0.12}
N_TRAIN = 6


@pytest.fixture
def reproduce(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_bench_script("reproduce", monkeypatch)


class Bypassed(Exception):
    """Raised by the spy pipeline: the sweep built a pipeline, so it would have trained or scored something."""


def spy_pipeline(cfg: PipelineConfig) -> Any:
    raise Bypassed


class FakePipeline:
    """Stands in for madpo.pipeline.stages.Pipeline: the same accessors, made-up stage results, every call counted
    (class-wide, so that the test sees the calls of the instance the sweep builds)."""

    calls: list[str] = []
    weights = b"sft weights"
    """The fake SFT model's bytes: another value stands for the same stages rebuilt on another machine."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        FakePipeline.calls.append("init")

    def _result(self, name: str, label: str, stats: dict, outputs: dict | None = None) -> StageResult:
        manifest = {"stats": stats, "outputs": outputs or {}, "seconds": 1.0}
        return StageResult(name, label, self.root / f"{label}-fake", "fake", manifest, cached=False)

    def sft(self) -> StageResult:
        model = self.root / "sft-fake" / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "model.safetensors").write_bytes(FakePipeline.weights)
        return self._result("sft", "sft", {}, {"model": "model"})

    def pairs(self) -> StageResult:
        FakePipeline.calls.append("pairs")
        outputs, tiers = {}, {}
        for t, frac in FRAC_DISAGREE.items():
            rows = [
                {"oracle_chosen": float(i % 3), "oracle_rejected": 1.0, "chosen_source": "sample1"}
                for i in range(N_TRAIN)
            ]
            write_jsonl(self.root / "pairs-fake" / t / "train.jsonl", rows)
            outputs[f"{t}/train"] = f"{t}/train.jsonl"
            tiers[t] = {"train": {"n": N_TRAIN, "frac_disagree": frac}, "eval": {"n": 3, "frac_disagree": frac}}
        return self._result("pairs", "pairs", {"tiers": tiers}, outputs)

    def reward(self, tier: str) -> StageResult:
        FakePipeline.calls.append(f"reward:{tier}")
        return self._result("reward", f"reward-{tier}", {"metrics": {"val/accuracy": 0.6}})

    def train_margins(self, tier: str) -> np.ndarray:
        FakePipeline.calls.append(f"margins:{tier}")
        return np.linspace(-1.0, 2.0, N_TRAIN)  # well inside ±τ: amp-only / reg-only are MADPO's / DPO's runs

    def evaluate_sft(self) -> StageResult:
        FakePipeline.calls.append("evaluate_sft")
        return self._result("evaluate", "evaluate-sft", {"reward": {"mean": 0.1, "se": 0.05, "sd": 1.0, "n": 3}})

    def policy(self, cfg: PolicyConfig) -> StageResult:
        label = policy_label(cfg)
        FakePipeline.calls.append(f"policy:{label}:{type(cfg.loss).__name__}")
        metrics = {"train/loss_step": 0.9, "train/loss_epoch": 0.5, "train/loss": 0.5, "val/loss": 0.6}
        if (cfg.method or "").startswith("beta_dpo"):
            metrics |= {"train/beta/effective_step": 0.3, "train/beta/effective_epoch": 0.125}
            metrics |= {"train/beta/effective": 0.125, "train/beta_dpo/kept_epoch": 0.8, "train/beta_dpo/kept": 0.8}
            metrics |= {"train/beta_dpo/clamped_epoch": 0.25, "train/beta_dpo/clamped": 0.25}
        return self._result("policy", label, {"margins": None, "metrics": metrics})

    def evaluate_model(self, model: StageResult) -> StageResult:
        seed = int(model.label.rsplit("-s", 1)[1][0])
        mean = 0.2 + 0.01 * (sum(map(ord, model.label)) % 40) + 0.05 * seed
        stats = {"reward": {"mean": mean, "se": 0.05, "sd": 1.0}, "kl": {"mean": 5.0 + seed, "se": 0.2}}
        return self._result("evaluate", model.label.replace("policy", "evaluate"), stats)


@pytest.fixture(autouse=True)
def fresh_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    FakePipeline.calls = []
    monkeypatch.setattr(FakePipeline, "weights", b"sft weights")


def args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--tiers",
        "high,low",
        "--seeds",
        "0,1",
        "--cells-dir",
        str(tmp_path / "cells"),
        "--results-dir",
        str(tmp_path / "results"),
        *extra,
        "-c",
        CI,
        "--output_dir",
        str(tmp_path / "run"),
    ]


TABLE = ["--methods", "dpo,madpo,madpo_amp_only,odpo,margin_target,cdpo,rdpo", "--noise-matched"]


def trained(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("policy:")]


def report_body(md: str) -> list[str]:
    """The report without the lines that depend on when and where it was written."""
    return [line for line in md.splitlines() if not line.startswith(("- Machine", "- Command"))]


@pytest.mark.parametrize("store", ["used", "bypassed"])
def test_a_fully_stored_sweep_writes_its_reports_and_builds_no_pipeline(
    reproduce: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    argv = args(tmp_path, *TABLE)
    first = reproduce.main(argv, pipeline=FakePipeline)
    md = Path(first["table"]).read_text()
    n_cells = len(trained(FakePipeline.calls))
    # 7 methods + 2 noise-matched, 2 tiers, 2 seeds; amp-only is MADPO's run (margins inside ±τ): not trained again
    assert n_cells == (9 - 1) * 2 * 2
    assert len(list((tmp_path / "cells").glob("*.json"))) == n_cells + 1 + 2 + 2  # + SFT, 2 pairs, 2 reward records

    import sweep.cells

    FakePipeline.calls = []
    monkeypatch.setattr(sweep.cells, "Pipeline", spy_pipeline)  # the default pipeline too, should one be built
    if store == "bypassed":  # the check must catch a sweep that ignores its store
        cellstore = sys.modules["cellstore"]
        monkeypatch.setattr(cellstore.CellStore, "get", lambda self, spec: None)
        with pytest.raises(Bypassed):
            reproduce.main(argv, pipeline=spy_pipeline)
        return
    again = reproduce.main(argv, pipeline=spy_pipeline)
    assert FakePipeline.calls == []
    assert report_body(Path(again["table"]).read_text()) == report_body(md)
    payload = json.loads((tmp_path / "results" / "imdb-offline.json").read_text())
    assert payload["train_pairs_per_tier"] == {"high": N_TRAIN, "low": N_TRAIN}
    assert payload["eval_pairs_per_tier"] == {"high": 3, "low": 3}
    assert payload["frac_disagree"] == {"high": FRAC_DISAGREE["high"], "low": FRAC_DISAGREE["low"]}
    assert payload["pending"] == [] and payload["rm_val_accuracy"]["high"] == 0.6


def test_stored_cells_are_skipped(reproduce: ModuleType, tmp_path: Path) -> None:
    reproduce.main(args(tmp_path, "--methods", "dpo,cdpo", "--seeds", "0"), pipeline=FakePipeline)
    assert len(trained(FakePipeline.calls)) == 2 * 2
    FakePipeline.calls = []
    reproduce.main(args(tmp_path, "--methods", "dpo,cdpo"), pipeline=FakePipeline)  # seeds 0,1 (args' own)
    runs = trained(FakePipeline.calls)
    assert len(runs) == 2 * 2 and all("-s1:" in r for r in runs)  # only the seed-1 cells were not stored
    assert "evaluate_sft" not in FakePipeline.calls  # the records were stored by the first run, on this build
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2 * 2 * 2 + 1 + 2
    FakePipeline.calls = []
    reproduce.main(args(tmp_path, "--methods", "dpo,cdpo"), pipeline=spy_pipeline)  # everything stored now


def test_a_cell_keeps_its_runs_final_metrics_and_the_report_shows_beta_dpos_batch_beta(
    reproduce: ModuleType, tmp_path: Path
) -> None:
    methods = "dpo,madpo,beta_dpo_madpo_repo,beta_dpo,beta_dpo_filter_only"
    written = reproduce.main(args(tmp_path, "--methods", methods, "--seeds", "0"), pipeline=FakePipeline)
    assert "policy:policy-beta_dpo_madpo_repo-high-s0:MADPORepoBetaDPOLoss" in FakePipeline.calls
    records = [json.loads(p.read_text()) for p in (tmp_path / "cells").glob("policy-*.json")]
    metrics = {r["result"]["cell"]["method"]: r["result"]["cell"]["train_metrics"] for r in records}
    # the last-epoch mean is kept under the plain name, one batch's value is dropped
    assert metrics["dpo"] == {"train/loss": 0.5, "val/loss": 0.6}
    assert metrics["beta_dpo"]["train/beta/effective"] == 0.125 and metrics["beta_dpo"]["train/beta_dpo/kept"] == 0.8
    md = Path(written["table"]).read_text()
    section = md.split("## β-DPO's batch β", 1)[1].split("\n## ", 1)[0]
    assert "| beta_dpo | high | 0 | 0.1250 | 25% | 0.80 |" in section
    assert "| beta_dpo | low | 0 | 0.1250 | 25% | 0.80 |" in section
    assert "| beta_dpo_madpo_repo | low | 0 | 0.1250 | 25% | 0.80 |" in section
    assert "| beta_dpo_filter_only | low | 0 | 0.1250 | 25% | 0.80 |" in section  # the α = 0 ablation is listed
    # the paper's β-DPO row stands beside both variants
    rows = [ln.split(" | ")[0] for ln in md.split("\n\n| method |", 1)[1].split("\n\n")[0].splitlines()[2:]]
    # in the order of --methods
    assert rows == ["| dpo", "| madpo", "| beta_dpo_madpo_repo", "| beta_dpo", "| beta_dpo_filter_only"]
    (repo_row,) = [ln for ln in md.splitlines() if ln.startswith("| beta_dpo_madpo_repo |") and "1.76" in ln]
    # the paper's ordering is checked once per β-DPO variant, never one variant against the other; the ablation is
    # not a baseline and gets no verdict
    verdicts = [ln for ln in md.splitlines() if ln.startswith("- tier high: measured order")]
    assert [("beta_dpo_madpo_repo" in v, "beta_dpo " in v + " ") for v in verdicts] == [(False, True), (True, False)]
    # a cell stored before the metrics were kept reads back without them and leaves the section out
    for p in (tmp_path / "cells").glob("policy-beta_dpo*.json"):
        record = json.loads(p.read_text())
        del record["result"]["cell"]["train_metrics"]
        p.write_text(json.dumps(record))
    written = reproduce.main(args(tmp_path, "--methods", methods, "--seeds", "0"), pipeline=spy_pipeline)
    assert "## β-DPO's batch β" not in Path(written["table"]).read_text()


def test_pending_lists_what_is_missing_and_trains_nothing(
    reproduce: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = args(tmp_path, *TABLE, "--pending")
    listed = reproduce.main(argv, pipeline=spy_pipeline)  # an empty store: nothing is computed to plan it either
    out = capsys.readouterr().out
    assert "record: pairs context / high" in out and "record: reward-model context / low" in out
    assert "record: SFT evaluation" in out
    assert "cell: table: cdpo_oracle_eps / high / seed 0" in out and "(after the tier's context record)" in out
    assert f"{len(listed['pending_cells'])} pending cells" in out
    assert not (tmp_path / "cells").exists() and not (tmp_path / "results").exists()

    reproduce.main(args(tmp_path, *TABLE, "--max-cells", "3"), pipeline=FakePipeline)
    FakePipeline.calls = []
    capsys.readouterr()
    listed = reproduce.main(argv, pipeline=spy_pipeline)
    out = capsys.readouterr().out
    assert "record:" not in out and "after the tier's context" not in out  # the records are stored now
    assert len(listed["pending_cells"]) == (9 - 1) * 2 * 2 - 3
    keys = {line.rsplit(" ", 1)[1] for line in out.splitlines() if line.startswith("cell: ")}
    stored = {p.stem.rsplit("-", 1)[1] for p in (tmp_path / "cells").glob("*.json")}
    assert len(keys) == len(listed["pending_cells"]) and not keys & stored
    # the fake cells store 1 s of policy and 1 s of evaluation each
    assert listed["median_cell_seconds"] == 2.0
    assert f"about {len(keys) * 2.0 / 3600:.1f} cell-hours are left" in out


def test_max_cells_runs_that_many_and_the_report_says_what_is_left(reproduce: ModuleType, tmp_path: Path) -> None:
    written = reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--max-cells", "2"), pipeline=FakePipeline)
    assert len(trained(FakePipeline.calls)) == 2
    md = Path(written["table"]).read_text()
    assert "| pending |" in md or "pending |" in md
    assert "## Pending cells (6)" in md
    command = next(line for line in md.splitlines() if line.startswith("    python bench/reproduce.py"))
    assert "--max-cells" not in command and "--methods dpo,madpo" in command
    payload = json.loads((tmp_path / "results" / "imdb-offline.json").read_text())
    assert len(payload["pending"]) == 6 and "--max-cells" not in payload["continue"]
    FakePipeline.calls = []
    reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--max-cells", "0"), pipeline=spy_pipeline)


def test_noise_matched_eps_is_the_tiers_measured_label_flip_rate(reproduce: ModuleType, tmp_path: Path) -> None:
    import sweep.plan

    cfg = parse_config(["-c", CI, "--output_dir", str(tmp_path / "run")])
    opts = reproduce.bench_parser().parse_args(["--methods", "dpo", "--tiers", "high,low", "--seeds", "0,1"])
    opts.noise_matched = True
    pairs = {t: {"frac_disagree": FRAC_DISAGREE[t]} for t in ("high", "low")}
    planned = [p for p in sweep.plan.plan(opts, cfg, pairs) if p.method.endswith("_oracle_eps")]
    assert len(planned) == 2 * 2 * 2
    for p in planned:
        eps = FRAC_DISAGREE[p.policy.tier]
        assert isinstance(p.policy.loss, CDPOLoss if p.method == "cdpo_oracle_eps" else RDPOLoss)
        assert p.policy.loss.label_smoothing == eps == p.extra["label_smoothing"] == p.extra["frac_disagree"]
        assert p.policy.loss.beta == cfg.policy.loss.beta
        for field in ("lr", "batch_size", "accumulate_grad_batches", "epochs", "warmup_ratio", "schedule"):
            assert getattr(p.policy, field) == getattr(cfg.policy, field)  # the same hyperparameters as every method
    assert len({p.key for p in planned}) == len(planned)
    assert isinstance(cfg.policy.loss, MADPOLoss)

    reproduce.main(args(tmp_path, "--methods", "dpo", "--noise-matched"), pipeline=FakePipeline)
    cells = json.loads((tmp_path / "results" / "imdb-offline.json").read_text())["cells"]
    matched = [c for c in cells if c["method"].endswith("_oracle_eps")]
    assert len(matched) == 2 * 2 * 2
    assert all(c["extra"]["label_smoothing"] == FRAC_DISAGREE[c["tier"]] for c in matched)
    assert sum("CDPOLoss" in c or "RDPOLoss" in c for c in FakePipeline.calls) == len(matched)


def test_competitor_rows_and_the_margin_best_section_appear(reproduce: ModuleType, tmp_path: Path) -> None:
    written = reproduce.main(args(tmp_path, *TABLE), pipeline=FakePipeline)
    md = Path(written["table"]).read_text()
    for method in ("odpo", "margin_target", "cdpo", "rdpo", "cdpo_oracle_eps", "rdpo_oracle_eps"):
        assert f"| {method} |" in md
    assert "## Who uses the margin best" in md and "not at matched KL" in md and "upper bound" in md
    assert "**Tier high: the same reward-model margin, used another way**" in md
    assert "within noise" in md or "resolved" in md
    rows = json.loads((tmp_path / "results" / "imdb-offline.json").read_text())["margin_best"]
    odpo = next(r for r in rows if r["tier"] == "low" and r["method"] == "odpo")
    assert odpo["d_dpo"]["n"] == 2 and odpo["d_dpo"]["ci"] == "t over 2 seeds"
    assert odpo["d_dpo"]["lo"] <= odpo["d_dpo"]["mean"] <= odpo["d_dpo"]["hi"]
    assert "madpo_amp_only on high is the madpo run of the same seed" in md


def test_matched_kl_reads_madpos_frontier_at_the_other_methods_kl(reproduce: ModuleType) -> None:
    import sweep.figures as figures

    madpo = [(4.0, 0.5), (8.0, 0.9)]  # (KL, reward), sorted by KL
    assert figures.interpolate(madpo, 6.0) == pytest.approx(0.7)  # halfway: (0.5 + 0.9) / 2
    assert figures.interpolate(madpo, 4.0) == pytest.approx(0.5)
    assert figures.interpolate(madpo, 9.0) is None and figures.interpolate(madpo, 3.0) is None  # no extrapolation
    lines = figures.matched_kl_lines({"madpo": madpo, "odpo": [(5.0, 0.55), (12.0, 1.0)]}, "beta")
    assert "| odpo | 5.00 | 0.550 | 0.600 | +0.050 |" in lines  # 0.5 + 0.4·(5 − 4)/4 = 0.6
    assert "| odpo | 12.00 | 1.000 | – | outside MADPO's range |" in lines
    # the other way round: ODPO's frontier at MADPO's KL 8 is 0.55 + 0.45·(8 − 5)/7
    assert f"| 8.00 | 0.900 | odpo | {0.55 + 0.45 * 3 / 7:.3f} | {0.9 - 0.55 - 0.45 * 3 / 7:+.3f} |" in lines
    assert "| 4.00 | 0.500 | odpo | – | outside odpo's range |" in lines
    assert figures.matched_kl_lines({"odpo": [(5.0, 0.55)]}, "beta") == []  # no MADPO frontier: no section
    one_point = figures.matched_kl_lines({"madpo": madpo, "ipo": [(5.0, 0.55)]}, "beta")
    assert "| ipo | 5.00 | 0.550 | 0.600 | +0.050 |" in one_point  # read against MADPO's frontier
    assert not any("And the other way round" in line for line in one_point)  # but it has no frontier to read


def test_each_method_is_read_against_dpos_frontier_at_its_own_kl(reproduce: ModuleType) -> None:
    import sweep.figures as figures

    dpo = [(10.0, 1.0), (20.0, 1.6)]  # (KL, reward), sorted by KL
    curves = {"dpo": dpo, "filter": [(16.0, 1.2)], "madpo": [(12.0, 1.3), (25.0, 2.0)]}
    lines = figures.against_dpo_lines(curves, "beta")
    assert "| filter | 16.00 | 1.200 | 1.360 | -0.160 |" in lines  # 1.0 + 0.6·(16 − 10)/10 = 1.36: a loss at its KL
    assert "| madpo | 12.00 | 1.300 | 1.120 | +0.180 |" in lines
    assert "| madpo | 25.00 | 2.000 | – | outside DPO's range |" in lines
    assert not any(line.startswith("| dpo |") for line in lines)  # DPO is the reference, not a row
    assert figures.against_dpo_lines({"dpo": [(10.0, 1.0)], "filter": [(16.0, 1.2)]}, "beta") == []  # one point
    assert figures.against_dpo_lines({"madpo": curves["madpo"]}, "beta") == []  # no DPO frontier: no section


def test_frontier_methods_are_planned_and_compared_at_matched_kl(reproduce: ModuleType, tmp_path: Path) -> None:
    extra = ["--no-table", "--frontier", "--frontier-grid", "0.05,0.1", "--frontier-methods", "dpo,madpo,odpo"]
    written = reproduce.main(args(tmp_path, *extra), pipeline=FakePipeline)
    runs = trained(FakePipeline.calls)
    assert len(runs) == 3 * 2 * 2  # 3 methods, 2 β, 2 seeds
    md = (tmp_path / "results" / "reward_kl_frontier.md").read_text()
    assert "At matched KL" in md and "| odpo |" in md and Path(written["frontier"]).exists()
    assert "Against DPO's frontier" in md
    with pytest.raises(SystemExit, match="unknown method"):
        reproduce.main(args(tmp_path, *extra[:-1], "dpo,nope"), pipeline=FakePipeline)


def test_a_frontier_method_can_have_its_own_grid(reproduce: ModuleType, tmp_path: Path) -> None:
    """`--frontier-method-grid` replaces one method's values and leaves the others on `--frontier-grid`; the cells
    run value-major, so that two cells (`--max-cells 2`) give each method its first value."""
    extra = ["--no-table", "--frontier", "--frontier-grid", "0.1", "--frontier-methods", "dpo,madpo"]
    own = ["--frontier-method-grid", "dpo=0.05,0.1", "--frontier-method-grid", "madpo=0.2"]
    reproduce.main(args(tmp_path, *extra, *own, "--seeds", "0", "--max-cells", "2"), pipeline=FakePipeline)
    first = json.loads((tmp_path / "results" / "reward_kl_frontier.json").read_text())["cells"]
    assert sorted((c["method"], c["extra"]["beta"]) for c in first) == [("dpo", 0.05), ("madpo", 0.2)]
    reproduce.main(args(tmp_path, *extra, *own, "--seeds", "0"), pipeline=FakePipeline)
    cells = json.loads((tmp_path / "results" / "reward_kl_frontier.json").read_text())["cells"]
    assert sorted((c["method"], c["extra"]["beta"]) for c in cells) == [("dpo", 0.05), ("dpo", 0.1), ("madpo", 0.2)]
    for bad in ("odpo=0.1", "dpo", "dpo="):  # not a frontier method, no '=', no values
        with pytest.raises(SystemExit, match="--frontier-method-grid"):
            reproduce.main(args(tmp_path, *extra, "--frontier-method-grid", bad), pipeline=FakePipeline)


def test_the_committed_competitor_cells_are_found_by_the_sweeps_config(
    reproduce: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's competitor sweep on configs/pipeline/imdb_1k.yaml finds every committed cell and record: an edit
    of that file (or of what keys a cell) that would orphan them fails here, not on a user's machine hours later."""
    argv = [
        "-c",
        str(REPO / "configs" / "pipeline" / "imdb_1k.yaml"),
        "--methods",
        "dpo,madpo,odpo,margin_target,cdpo,rdpo,hinge",
        "--noise-matched",
        "--tiers",
        "high,medium,low",
        "--seeds",
        "0,1,2",
        "--frontier",
        "--frontier-grid",
        "0.05,0.1",
        "--frontier-tier",
        "high",
        "--frontier-methods",
        "dpo,madpo,odpo,margin_target",
        "--results-dir",
        str(tmp_path / "results"),
        "--pending",
    ]
    listed = reproduce.main(argv, pipeline=spy_pipeline)
    out = capsys.readouterr().out
    assert listed["pending_cells"] == [] and listed["pending_records"] == [], out
    assert "cell-hours are left" not in out  # nothing is left to estimate


def test_time_budget_starts_no_cell_that_cannot_finish(reproduce: ModuleType, tmp_path: Path) -> None:
    """A stored cell took 2 s (the fake stages' 1 s each), so a budget of 0.6 s starts nothing and the report lists
    every cell as pending, while a budget of 10 min runs them all; the continue command drops the budget."""
    reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--max-cells", "1"), pipeline=FakePipeline)
    FakePipeline.calls = []
    written = reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--time-budget", "0.01"), pipeline=FakePipeline)
    assert trained(FakePipeline.calls) == []
    payload = json.loads((tmp_path / "results" / "imdb-offline.json").read_text())
    assert len(payload["pending"]) == 7 and "--time-budget" not in payload["continue"]
    assert "## Pending cells (7)" in Path(written["table"]).read_text()
    FakePipeline.calls = []
    reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--time-budget", "10"), pipeline=FakePipeline)
    assert len(trained(FakePipeline.calls)) == 7


def test_the_budget_expects_the_last_cell_own_time_before_the_stored_median(reproduce: ModuleType) -> None:
    import time

    from sweep.runner import Budget

    assert Budget(None, estimate=1e9).allows()
    assert Budget(time.time() + 60, estimate=None).allows()  # nothing known: the first cell starts
    budget = Budget(time.time() + 60, estimate=1e9)
    assert not budget.allows()
    budget.timed(lambda: time.sleep(0.01))
    assert 0.005 < budget.estimate < 30 and budget.allows()
    assert "2 cells left unstarted" in budget.stop_message(2)


@pytest.mark.parametrize("hashing", ["content", "blind"])
def test_each_cell_records_its_input_build_and_a_rebuild_gets_its_own_records(
    reproduce: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashing: str
) -> None:
    """Seed 0 on one build of the shared stages, seed 1 on a rebuild whose SFT model differs (another machine): each
    cell holds its build, the rebuild's records are stored beside the first build's (which stay), the report names
    both builds, and MADPO − DPO pairs seeds only within one build. With a build hash blind to the content, the
    same run passes the rebuild unnoticed: the checks below depend on the hash."""
    import sweep.cells

    if hashing == "blind":
        monkeypatch.setattr(sweep.cells, "shared_build", lambda pipe: "0" * 12)
    reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--seeds", "0"), pipeline=FakePipeline)
    n_first = len(list((tmp_path / "cells").glob("*.json")))
    FakePipeline.weights = b"sft weights, rebuilt on another CPU"
    FakePipeline.calls = []
    written = reproduce.main(args(tmp_path, "--methods", "dpo,madpo"), pipeline=FakePipeline)
    if hashing == "blind":
        assert "evaluate_sft" not in FakePipeline.calls and "## Input builds" not in Path(written["table"]).read_text()
        return
    assert len(trained(FakePipeline.calls)) == 2 * 2 and "evaluate_sft" in FakePipeline.calls
    # the rebuild's own SFT row, pairs and reward records for both tiers; the first build's are kept
    assert len(list((tmp_path / "cells").glob("*.json"))) == n_first + 2 * 2 + 1 + 2 + 2
    payload = json.loads((tmp_path / "results" / "imdb-offline.json").read_text())
    builds = {c["seed"]: c["inputs"]["build"] for c in payload["cells"]}
    assert len(set(builds.values())) == 2
    assert set(payload["input_builds"]) == set(builds.values())
    assert all(len(b["pairs"]) == 2 and b["sft"] is not None for b in payload["input_builds"].values())
    madpo = [c for c in payload["cells"] if c["method"] == "madpo"]
    assert all(c["inputs"]["margins"] for c in madpo)
    assert all(c["inputs"]["margins"] is None for c in payload["cells"] if c["method"] == "dpo")
    md = Path(written["table"]).read_text()
    assert "## Input builds (2)" in md and f"`{builds[0]}`" in md and f"`{builds[1]}`" in md

    cells = [sweep.cells.Cell(**c) for c in payload["cells"]]
    by = {m: [c for c in cells if c.method == m and c.tier == "high"] for m in ("dpo", "madpo")}
    assert sweep.cells.paired_difference(by["madpo"], by["dpo"])["n"] == 2
    moved = [dataclasses.replace(c, inputs={"build": "other"}) if c.seed == 1 else c for c in by["dpo"]]
    assert sweep.cells.paired_difference(by["madpo"], moved)["n"] == 1  # seed 1's DPO is on another build now


def test_a_reward_model_retrained_with_other_margins_on_the_same_build_is_refused(
    reproduce: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SFT model and pairs rebuilt bit for bit, the reward model not (another thread count): MADPO cells would be
    stored beside the first model's diagnostics and averaged with cells that read other margins. The sweep stops
    before training any; DPO cells, which read no margins, still run."""
    reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--seeds", "0"), pipeline=FakePipeline)
    n_stored = len(list((tmp_path / "cells").glob("*.json")))
    same = FakePipeline.train_margins
    monkeypatch.setattr(FakePipeline, "train_margins", lambda self, tier: same(self, tier) + 1e-7)
    FakePipeline.calls = []
    with pytest.raises(SystemExit, match="high reward model's margins here .* differ from those of the stored"):
        reproduce.main(args(tmp_path, "--methods", "dpo,madpo"), pipeline=FakePipeline)
    assert trained(FakePipeline.calls) == [] and len(list((tmp_path / "cells").glob("*.json"))) == n_stored
    reproduce.main(args(tmp_path, "--methods", "dpo"), pipeline=FakePipeline)
    assert len(trained(FakePipeline.calls)) == 2  # seed 1 on both tiers
    monkeypatch.setattr(FakePipeline, "train_margins", same)
    FakePipeline.calls = []
    reproduce.main(args(tmp_path, "--methods", "dpo,madpo"), pipeline=FakePipeline)
    assert len(trained(FakePipeline.calls)) == 2  # the same margins again: MADPO seed 1 runs


def test_cells_and_records_stored_before_builds_count_as_one_unrecorded_build(
    reproduce: ModuleType, tmp_path: Path
) -> None:
    reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--seeds", "0"), pipeline=FakePipeline)
    for path in (tmp_path / "cells").glob("*.json"):  # as the code wrote them before it recorded builds
        record = json.loads(path.read_text())
        record["result"].pop("inputs", None)
        record["result"].get("cell", {}).pop("inputs", None)
        path.write_text(json.dumps(record))
    written = reproduce.main(args(tmp_path, "--methods", "dpo,madpo", "--seeds", "0"), pipeline=spy_pipeline)
    md = Path(written["table"]).read_text()
    assert "## Input builds" not in md and "| `unrecorded` |" in md  # one build: no section, the column says so
    FakePipeline.calls = []
    written = reproduce.main(args(tmp_path, "--methods", "dpo,madpo"), pipeline=FakePipeline)
    md = Path(written["table"]).read_text()
    assert "## Input builds (2)" in md and "| `unrecorded` | dpo high s0" in md


def _stored_results(cells_dir: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text())["result"] for path in sorted(cells_dir.glob("*.json"))}


def test_each_build_declared_after_storing_has_equal_records_of_its_own(reproduce: ModuleType) -> None:
    """A build written into records stored before builds were recorded (`inputs.declared`) must rest on evidence in
    the same store: the declared SFT evaluation and pairs records equal, in every number, records that computed that
    build themselves. The check fails when the build named is another, when a number differs, or when the build's own
    record is missing."""
    import copy

    import sweep.builds
    import sweep.cells

    stores = sorted(p for p in (REPO / "bench" / "results" / "cells").iterdir() if p.is_dir())
    for store in stores:
        assert sweep.builds.declared_without_evidence(_stored_results(store)) == [], store
    results = _stored_results(REPO / "bench" / "results" / "cells" / "paper_size")
    declared = {n: r for n, r in results.items() if "declared" in (r.get("cell", r).get("inputs") or {})}
    assert {n.split("-", 1)[0] for n in declared} >= {"sft_eval", "pairs_context", "policy"}  # not vacuous

    def broken(edit: Callable[[dict[str, dict]], None]) -> list[str]:
        changed = copy.deepcopy(results)
        edit(changed)
        return sweep.builds.declared_without_evidence(changed)

    def other_build(rs: dict[str, dict]) -> None:  # declared as the Zen 5 build, whose records differ
        for name in declared:
            rs[name].get("cell", rs[name])["inputs"]["build"] = "b5ef5171f4d3"

    def one_number(rs: dict[str, dict]) -> None:
        name = next(n for n in declared if n.startswith("pairs_context"))
        rs[name]["frac_disagree"] += 1e-15

    def own_record_gone(rs: dict[str, dict]) -> None:
        build = next(iter(declared.values())).get("inputs", {}).get("build")
        for name in [n for n, r in rs.items() if n.startswith("sft_eval") and n not in declared]:
            if (rs[name].get("inputs") or {}).get("build") == build:
                del rs[name]

    assert any("differs" in p for p in broken(other_build))
    assert any("differs from the build's own pairs_context-high" in p for p in broken(one_number))
    assert any("no sft_eval record it computed" in p for p in broken(own_record_gone))
    dpo = next(r["cell"] for n, r in declared.items() if n.startswith("policy-dpo"))
    cell = sweep.cells.Cell(**dpo)
    assert sweep.builds.build_of(cell) == dpo["inputs"]["build"]
    text = "\n".join(sweep.builds.builds_section([cell, dataclasses.replace(cell, inputs=None)], {}))
    assert "declared afterwards" in text and f"`{dpo['inputs']['build']}`" in text


def test_the_build_hash_reads_every_byte_but_the_model_card_and_no_path(reproduce: ModuleType, tmp_path: Path) -> None:
    from sweep.builds import array_digest, files_digest

    for name in ("a", "b"):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "weights.bin").write_bytes(b"\x00" * 1000 + b"\x01")
        (tmp_path / name / "train.jsonl").write_text('{"chosen": "x"}\n')
    digest = files_digest([tmp_path / "a" / "model", tmp_path / "a" / "train.jsonl"])
    assert digest == files_digest([tmp_path / "b" / "model", tmp_path / "b" / "train.jsonl"])  # another directory
    (tmp_path / "b" / "model" / "README.md").write_text("tokens/s 3070.5")  # the model card's run metrics
    assert digest == files_digest([tmp_path / "b" / "model", tmp_path / "b" / "train.jsonl"])
    (tmp_path / "b" / "model" / "weights.bin").write_bytes(b"\x00" * 1000 + b"\x02")  # one byte
    assert digest != files_digest([tmp_path / "b" / "model", tmp_path / "b" / "train.jsonl"])
    m = np.linspace(-1.0, 1.0, 7)
    assert array_digest(m) == array_digest(m.copy()) != array_digest(np.nextafter(m, 2.0))  # one ulp each


def test_the_build_hash_reads_the_pairs_texts_and_labels_not_the_oracles_scores(
    reproduce: ModuleType, tmp_path: Path
) -> None:
    """The oracle is retrained on each machine and its scores can differ in the last bits while the pairs (texts,
    labels) are the same: such a rebuild is the same build. A changed text or a swapped label is not."""
    from sweep.builds import files_digest

    def pairs(name: str, score: float, chosen: str = " good", rejected: str = " bad") -> Path:
        row = {"prompt": "p", "chosen": chosen, "rejected": rejected, "oracle_chosen": score, "oracle_rejected": 0.1}
        path = tmp_path / name / "train.jsonl"
        path.parent.mkdir()
        path.write_text(json.dumps({**row, "label_agrees_with_oracle": True}) + "\n")
        return path

    digest = files_digest([pairs("a", 0.9171104003938217)])
    assert files_digest([pairs("b", float(np.nextafter(0.9171104003938217, 1.0)))]) == digest
    assert files_digest([pairs("c", 0.9171104003938217, chosen=" goods")]) != digest
    assert files_digest([pairs("d", 0.9171104003938217, chosen=" bad", rejected=" good")]) != digest


def _cell(method: str, seed: int, build: str, mean: float, margins: dict | None = None) -> Any:
    import sweep.cells

    return sweep.cells.Cell(
        method=method, tier="high", seed=seed, mean=mean, se=0.01, sd=0.1, kl=1.0, kl_se=0.1, policy_seconds=1.0,
        eval_seconds=1.0, cached=False, policy_stage=f"{method}-s{seed}", eval_stage="eval", margins=margins,
        inputs={"build": build, "margins": None},
    )  # fmt: skip


def test_the_decomposition_pairs_a_variant_with_dpo_and_madpo_of_its_own_seeds(reproduce: ModuleType) -> None:
    """A variant run on one seed is compared with MADPO's gain on that seed, not with MADPO's mean over all three:
    seed 0 (another build) has a far smaller gain, and a Δ over unequal seed sets would mix the two."""
    from sweep import report

    cells = [_cell("dpo", s, b, 1.0) for s, b in ((0, "A"), (1, "B"), (2, "B"))]
    cells += [_cell("madpo", 0, "A", 1.1), _cell("madpo", 1, "B", 1.6), _cell("madpo", 2, "B", 1.6)]
    cells += [_cell("madpo_no_downweight", 1, "B", 1.2)]
    lines = report._decomposition(parse_config(["-c", CI]), cells, ["dpo", "madpo", "madpo_no_downweight"], ["high"])
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in lines if ln.startswith("| madpo")}
    assert "+0.433 (3)" in rows["madpo"]
    assert "+0.200 (1); MADPO +0.600" in rows["madpo_no_downweight"]


def test_the_margin_row_reads_the_madpo_cell_of_the_reward_records_build(reproduce: ModuleType) -> None:
    """The row quotes the first stored build's reward-model accuracy; its margin numbers must be that build's too."""
    from sweep import report

    def margins(sd: float) -> dict:
        shares = {"frac_capped_below_minus_tau": 0.0, "frac_amplified_0_to_tau": 0.7, "frac_damped_above_tau": 0.0}
        return {
            "agrees_with_oracle": 0.6,
            "corr_with_oracle_gap": 0.4,
            "sd": sd,
            "frac_downweighted_negative": 0.3,
            **shares,
        }

    # build A's cell first: the last MADPO cell (build B's) is the one a per-tier dict of all cells would keep
    cells = [_cell("madpo", 0, "A", 1.1, margins(0.294)), _cell("madpo", 1, "B", 1.6, margins(0.385))]
    reward = {"high": {"rm_val_accuracy": 0.605, "inputs": {"build": "A"}}}
    (row,) = [ln for ln in report._margin_sections(cells, ["high"], reward) if ln.startswith("| high")]
    assert "| 0.294 |" in row and "0.385" not in row


def test_the_committed_paper_size_cells_of_the_256_pair_reward_model_are_found(
    reproduce: ModuleType, tmp_path: Path
) -> None:
    """bench/results/paper_size/rm_val256/'s command still finds its committed cells and records after the config
    moved to a 1,000-pair validation slice: only the cells never trained are pending (an edit that orphans the
    stored high-tier cells fails here)."""
    argv = ["-c", str(REPO / "configs" / "pipeline" / "paper_size.yaml"), "--reward.n_val", "256", "--methods"]
    argv += ["dpo,madpo,ipo,beta_dpo,madpo_no_downweight,madpo_no_amplify,madpo_amp_only,madpo_reg_only"]
    argv += ["--tiers", "high", "--seeds", "0,1,2,3", "--results-dir", str(tmp_path / "results"), "--pending"]
    argv += ["--cells-dir", str(REPO / "bench" / "results" / "cells" / "paper_size")]
    listed = reproduce.main(argv, pipeline=spy_pipeline)
    never_trained = {"ipo-high-s0", "beta_dpo-high-s0", "madpo_no_downweight-high-s0", "madpo_no_amplify-high-s0"}
    never_trained |= {"madpo_no_downweight-high-s3", "madpo_no_amplify-high-s3"}
    assert listed["pending_records"] == []
    pending = {
        label.removeprefix("table: ").replace(" / seed ", "-s").replace(" / ", "-") for label in listed["pending_cells"]
    }
    assert pending == never_trained


def test_each_declared_same_content_build_has_the_same_committed_records(reproduce: ModuleType) -> None:
    """An old build hash may stand for a later one (`SAME_CONTENT`) only where the committed records of both builds
    agree: the pairs (count, label noise, mean oracle gap to the oracle's float noise), the SFT evaluation and the
    reward-model margins. A declared pair without that evidence, or with records that differ, fails here."""
    import sweep.builds
    import sweep.cells

    cells_dir = REPO / "bench" / "results" / "cells" / "paper_size"
    records: dict[str, list[tuple[str, dict]]] = {}
    for path in cells_dir.glob("*.json"):
        kind = path.name.split("-", 1)[0]
        if kind in ("sft_eval", "pairs_context", "reward_context") or kind.startswith("policy"):
            result = json.loads(path.read_text())["result"]
            result = result.get("cell", result)
            build = (result.get("inputs") or {}).get("build")
            if build is not None:
                records.setdefault(build, []).append((path.name, result))
    assert sweep.builds.SAME_CONTENT
    for old, new in sweep.builds.SAME_CONTENT.items():
        assert old in records and new in records, (old, new)
        for kind in ("sft_eval", "pairs_context-high"):
            (a,) = [r for name, r in records[old] if name.startswith(kind)]
            (b,) = [r for name, r in records[new] if name.startswith(kind)]
            if kind == "sft_eval":
                assert a["reward"]["mean"] == pytest.approx(b["reward"]["mean"], rel=1e-12, abs=0)
            else:
                assert (a["n_train"], a["frac_disagree"]) == (b["n_train"], b["frac_disagree"])
                assert a["mean_abs_oracle_gap"] == pytest.approx(b["mean_abs_oracle_gap"], rel=1e-12, abs=0)
        margins = {r["inputs"]["margins"] for _, r in records[old] if r.get("method") == "madpo"}
        margins_new = {r["inputs"]["margins"] for _, r in records[new] if r.get("method") == "madpo"}
        assert margins & margins_new  # a MADPO cell of each build read the same reward-model margins
        cell = sweep.cells.Cell(**next(r for _, r in records[old] if "method" in r))
        assert sweep.builds.build_of(cell) == new
        text = "\n".join(sweep.builds.builds_section([cell, dataclasses.replace(cell, inputs=None)], {}))
        assert f"stored with build `{old}`" in text and f"listed under `{new}`" in text
