"""Pipeline cache keys cover what each stage reads: a stage's inputs are one frozen object whose hash is the key, so
a changed trainer setting re-runs the stages that read it, display-only settings re-run nothing, and a stage body,
which receives only that object (never the `TrainerConfig`), cannot read a setting its key lacks."""

from __future__ import annotations

import dataclasses
import typing
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


def _inputs(tmp_path: Path, cfg: PipelineConfig) -> dict[str, stages.StageInputs]:
    """Every stage's inputs, as `Pipeline` builds them, on stand-in upstream results (no stage body runs)."""
    up = stages.StageResult("x", "x", tmp_path, "abc", {}, cached=True)
    training = stages.TrainingSettings.of(cfg.trainer)
    acc = cfg.trainer.accelerator
    lengths = (16, 64)
    return {
        "reviews": stages.ReviewsInputs.of(cfg.data),
        "tokenizer": stages.TokenizerInputs.of(cfg.base_model, up),
        "oracle": stages.OracleInputs.of(cfg.oracle, 68, acc, up, up),
        "base_model": stages.base_model_inputs(cfg.base_model, training, up, up),
        "sft": stages.SftInputs(cfg.sft, 16, training, up, up),
        "pairs": stages.PairsInputs(cfg.pairs, 16, cfg.oracle, acc, up, up, up),
        "reward-high": stages.RewardInputs(cfg.reward, "high", *lengths, training, up, up),
        "policy-madpo-high-s0": stages.PolicyInputs.of(cfg.policy, lengths, training, up, up, up),
        "evaluate-sft": stages.EvaluateInputs(cfg.evaluate, 8, cfg.oracle, acc, up, None, up, up),
    }


def _keys(tmp_path: Path, trainer: TrainerConfig) -> dict[str, str]:
    cfg = PipelineConfig()
    cfg.trainer = trainer
    return {label: inputs.key for label, inputs in _inputs(tmp_path, cfg).items()}


def test_every_keyed_trainer_field_changes_the_training_stages_keys(tmp_path) -> None:
    # a new TrainerConfig field must be listed here (or be display-only)
    assert set(CHANGED) | {"progress_bar", "num_threads"} == {f.name for f in dataclasses.fields(TrainerConfig)}
    assert set(CHANGED) == set(stages.TRAINING_FIELDS)
    default = _keys(tmp_path, TrainerConfig())
    assert default == _keys(tmp_path, TrainerConfig())
    for name, value in CHANGED.items():
        assert getattr(TrainerConfig(), name) != value
        changed = _keys(tmp_path, dataclasses.replace(TrainerConfig(), **{name: value}))
        for stage in ("base_model", "sft", "reward-high", "policy-madpo-high-s0"):
            assert changed[stage] != default[stage], (name, stage)
        # sampling stages read the device only; the others no trainer setting
        for stage in ("pairs", "evaluate-sft"):
            assert (changed[stage] != default[stage]) == (name == "accelerator"), (name, stage)
        for stage in ("reviews", "tokenizer", "oracle"):
            assert changed[stage] == default[stage], (name, stage)


def test_display_only_fields_keep_the_keys(tmp_path) -> None:
    default = _keys(tmp_path, TrainerConfig())
    quiet = _keys(tmp_path, TrainerConfig(progress_bar=False, num_threads=1))
    assert quiet == default


def _fields(inputs: object) -> list[tuple[str, object]]:
    """(path, value) of every leaf a stage's inputs hold: dataclass fields, recursively, but not into upstream
    results (an upstream result is its label and key) or into losses (their options)."""
    out = []
    for f in dataclasses.fields(inputs):
        value = getattr(inputs, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, stages.StageResult):
            out += [(f"{f.name}.{path}", v) for path, v in _fields(value)]
        else:
            out.append((f.name, value))
    return out


def _changed(value: object, tmp_path: Path) -> object:
    if isinstance(value, stages.StageResult):
        return dataclasses.replace(value, key=value.key + "0")
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 7
    pytest.skip(f"no change rule for {type(value).__name__}")  # pragma: no cover


def _replace(inputs: object, path: str, value: object) -> object:
    head, _, rest = path.partition(".")
    if rest:
        value = _replace(getattr(inputs, head), rest, value)
    return dataclasses.replace(inputs, **{head: value})


def test_a_stages_inputs_are_frozen_and_its_key_changes_with_every_field_it_holds(tmp_path) -> None:
    for label, inputs in _inputs(tmp_path, PipelineConfig()).items():
        first = dataclasses.fields(inputs)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(inputs, first, None)
        for path, value in _fields(inputs):
            if path == "loss":
                continue  # its class and options: tests/test_components.py
            changed = _replace(inputs, path, _changed(value, tmp_path))
            assert changed.key != inputs.key, (label, path)
        # what the stage's key is computed from is the object alone: the same inputs, the same key
        assert dataclasses.replace(inputs).key == inputs.key


def test_a_stage_body_sees_its_inputs_the_stage_dir_and_the_unhashed_context_only(tmp_path) -> None:
    # the context holds no trainer settings a stage could read behind its key
    assert {f.name for f in dataclasses.fields(stages.Context)} == {"output_dir", "progress_bar", "results"}
    bodies = [("base_model", "train_base_model"), ("sft", "train_sft"), ("reward", "train_reward_model")]
    for module, name in [*bodies, ("policy", "train_policy"), ("pairs", "sample_and_label_pairs")]:
        body = getattr(getattr(stages, module), name)
        assert list(typing.get_type_hints(body)) == ["inputs", "path", "ctx", "return"], name

    @dataclasses.dataclass(frozen=True)
    class Toy(stages.StageInputs):
        stage = "toy"
        lr: float

    ctx = stages.Context(tmp_path, progress_bar=False)
    seen = []

    def body(inputs: Toy, path: Path, ctx: stages.Context) -> stages.StageOutput:
        seen.append(inputs)
        return stages.StageOutput({}, {"lr": inputs.lr, "bar": ctx.progress_bar})

    result = stages.run_stage(ctx, Toy(1.0), body)
    assert result.stats == {"lr": 1.0, "bar": False} and result.key == Toy(1.0).key
    assert result.manifest["config"] == {"lr": 1.0}
    assert stages.run_stage(ctx, Toy(1.0), body).cached and len(seen) == 1
    assert stages.run_stage(ctx, Toy(2.0), body).key != result.key and len(seen) == 2
