"""Pipeline cache keys cover what each stage reads: a changed trainer setting re-runs the stages that read it, and a
stage that reads a trainer setting its key lacks is stopped instead of caching a result for the wrong settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from madpo.pipeline import stages
from madpo.pipeline.config import PipelineConfig, TrainerConfig

# a value different from each default, per keyed field
CHANGED = {
    "accelerator": "cpu",
    "devices": 2,
    "precision": "bf16-mixed",
    "log_every_n_steps": 3,
    "gradient_clip_val": 0.5,
}


def _keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, trainer: TrainerConfig) -> dict[str, str]:
    """The key every stage function would run under with these trainer settings (no stage body runs)."""
    keys: dict[str, str] = {}

    def capture(ctx, name, config, upstream, body, *, label=None):  # noqa: ANN001, ANN202
        keys[label or name] = stages.stage_key(name, config, upstream)
        return None

    monkeypatch.setattr(stages, "run_stage", capture)
    cfg = PipelineConfig()
    ctx = stages.Context(tmp_path, trainer)
    up = stages.StageResult("x", "x", tmp_path, "abc", {}, cached=True)
    stages.stage_base_model(ctx, cfg.base_model, up, up)
    stages.stage_sft(ctx, cfg.sft, 16, up, up)
    stages.stage_pairs(ctx, cfg.pairs, 16, cfg.oracle, up, up, up)
    stages.stage_reward(ctx, cfg.reward, "high", (16, 64), up, up)
    stages.stage_policy(ctx, cfg.policy, (16, 64), up, up, up)
    stages.stage_evaluate(ctx, cfg.evaluate, 8, cfg.oracle, up, up, up, up)
    return keys


def test_every_keyed_trainer_field_changes_the_training_stages_keys(monkeypatch, tmp_path) -> None:
    # a new TrainerConfig field must be listed here (or be display-only)
    assert set(CHANGED) | {"progress_bar", "num_threads"} == {f.name for f in dataclasses.fields(TrainerConfig)}
    default = _keys(monkeypatch, tmp_path, TrainerConfig())
    assert default == _keys(monkeypatch, tmp_path, TrainerConfig())
    for name, value in CHANGED.items():
        assert getattr(TrainerConfig(), name) != value
        changed = _keys(monkeypatch, tmp_path, dataclasses.replace(TrainerConfig(), **{name: value}))
        for stage in ("base_model", "sft", "reward-high", "policy-madpo-high-s0"):
            assert changed[stage] != default[stage], (name, stage)
        # sampling stages read the device only
        for stage in ("pairs", "evaluate-sft"):
            assert (changed[stage] != default[stage]) == (name == "accelerator"), (name, stage)


def test_display_only_fields_keep_the_keys(monkeypatch, tmp_path) -> None:
    default = _keys(monkeypatch, tmp_path, TrainerConfig())
    quiet = _keys(monkeypatch, tmp_path, TrainerConfig(progress_bar=False, num_threads=1))
    assert quiet == default


def test_a_stage_reading_an_unkeyed_trainer_field_is_stopped(tmp_path) -> None:
    ctx = stages.Context(tmp_path, TrainerConfig())

    def body(path: Path) -> stages.StageOutput:
        return stages.StageOutput({}, {"clip": ctx.trainer.gradient_clip_val})

    # a programming error, not a user error: it keeps its traceback on the command line
    with pytest.raises(RuntimeError, match=r"read trainer\.gradient_clip_val, which its cache key lacks"):
        stages.run_stage(ctx, "toy", {"lr": 1.0}, [], body)
    assert not list(tmp_path.glob("toy-*"))  # nothing left that a later run could take as finished
    assert isinstance(ctx.trainer, TrainerConfig)  # the recorder is gone again
    keyed = {"lr": 1.0, "trainer": stages.trainer_key(ctx.trainer, ("gradient_clip_val",))}
    result = stages.run_stage(ctx, "toy", keyed, [], body)
    assert result.stats == {"clip": 1.0}
    # display-only fields need no key
    shown = stages.run_stage(
        ctx, "toy2", {}, [], lambda path: stages.StageOutput({}, {"bar": ctx.trainer.progress_bar})
    )
    assert shown.stats == {"bar": True}
