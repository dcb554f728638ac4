"""Interrupted runs resume exactly (and the check that says so catches broken resumes); checkpoints carrying pickled
payloads are refused."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import cli_env, run_cli_subprocess, scalars, tiny_args

STEPS = (
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--checkpoint.every_n_train_steps=2",
)
KILL_AT = 9  # SIGKILL before step 9 trains: last.ckpt is step 8, mid-epoch (epoch 2, 2 of its 6 batches trained)
# Every run of a comparison gets the same environment and the same callbacks. The intra-op thread count in particular
# changes MKL's sgemm reduction order (1 vs 2 threads: ~3e-8 in the first gradients, ~5e-6 in the weights after one
# AdamW step, which normalises tiny gradients up), so it is pinned rather than left to the machine's core count.
ENV = cli_env(OMP_NUM_THREADS="1")


def _killer(step: int) -> tuple[str, ...]:
    return ("--trainer.callbacks+=tests.helpers.KillAtStep", f"--trainer.callbacks.step={step}")


class ResumeRuns:
    """Per config, one uninterrupted run and one run SIGKILLed at step KILL_AT, built once per module and shared.

    `resume_in_place` continues the killed run itself with `--ckpt_path last` (what a user does). `resume_copy` first
    copies the killed run (as it was when killed) to a new run name, so that several resumes, some deliberately
    broken, can start from the same checkpoint; the absolute paths in the checkpoint's callback state (ModelCheckpoint's
    dirpath, last and best paths) are moved with it, so the copy resumes exactly as the original would in place.
    """

    def __init__(self, root: Path, reward_model: str) -> None:
        self.root, self.reward_model = root, reward_model
        self._built: set[str] = set()

    def _args(self, config: str, name: str, *extra: str) -> list[str]:
        config, _, variant = config.partition("+")
        model = [f"--data.reward_model={self.reward_model}"] if config == "madpo.yaml" else []
        if variant == "lora-dropout":  # dropout draws from the global RNG, which no checkpoint holds
            model += [f"--model.init_args.lora.{k}={v}" for k, v in (("r", 4), ("alpha", 8), ("dropout", 0.1))]
        return tiny_args(config, self.root, *STEPS, *model, *extra, name=self._name(config, variant, name))

    @staticmethod
    def _name(config: str, variant: str, name: str) -> str:
        return f"{Path(config).stem}{'-' + variant if variant else ''}-{name}"

    def run_dir(self, config: str, name: str) -> Path:
        config, _, variant = config.partition("+")
        return self.root / "runs" / self._name(config, variant, name)

    def straight_and_killed(self, config: str) -> tuple[Path, Path]:
        """The version directories of the uninterrupted run and of an untouched copy of the killed run."""
        if config not in self._built:
            run_cli_subprocess(self._args(config, "straight", *_killer(-1)), env=ENV)
            run_cli_subprocess(self._args(config, "killed", *_killer(KILL_AT)), env=ENV, returncode=-9)
            shutil.copytree(self.run_dir(config, "killed"), self.run_dir(config, "as-killed"))
            self._built.add(config)
        return self.run_dir(config, "straight") / "version_0", self.run_dir(config, "as-killed") / "version_0"

    def resume_in_place(self, config: str) -> Path:
        self.straight_and_killed(config)
        run_cli_subprocess(self._args(config, "killed", *_killer(-1), "--ckpt_path=last"), env=ENV)
        return self.run_dir(config, "killed") / "version_0"

    def resume_copy(self, config: str, name: str, *extra: str) -> Path:
        self.straight_and_killed(config)
        old, new = self.run_dir(config, "killed"), self.run_dir(config, name)
        shutil.copytree(self.run_dir(config, "as-killed"), new)
        for path in (new / "version_0" / "checkpoints").glob("*.ckpt"):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            checkpoint["callbacks"] = _relocate(checkpoint["callbacks"], str(old), str(new))
            torch.save(checkpoint, path)
        run_cli_subprocess(self._args(config, name, *_killer(-1), *extra, "--ckpt_path=last"), env=ENV)
        return new / "version_0"


def _relocate(value, old: str, new: str):  # noqa: ANN001, ANN202
    """`value` with every string (keys included) that starts with the directory `old` moved under `new`."""
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + os.sep) else value
    if isinstance(value, dict):
        return {_relocate(k, old, new): _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_relocate(v, old, new) for v in value)
    return value


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, random_reward_model) -> ResumeRuns:
    return ResumeRuns(tmp_path_factory.mktemp("resume"), random_reward_model)


def _last(version: Path) -> dict:
    stray = sorted(p.name for p in (version / "checkpoints").glob("last-v*.ckpt"))
    assert not stray, f"a resume wrote {stray} beside last.ckpt instead of continuing it"
    return torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the tensors of two flat dicts; inf where keys, shapes or dtypes differ."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if isinstance(x, float) and isinstance(y, float):
            worst = max(worst, abs(x - y))
        elif not torch.is_tensor(x):
            worst = max(worst, 0.0 if x == y else math.inf)
        elif x.shape != y.shape or x.dtype != y.dtype:
            return math.inf
        elif x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def _optimizer_diff(a: list[dict], b: list[dict]) -> float:
    """Largest difference between two lists of optimiser state dicts: per-parameter state and param groups (lr...)."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x["state"].keys() != y["state"].keys() or len(x["param_groups"]) != len(y["param_groups"]):
            return math.inf
        for idx, state in x["state"].items():
            worst = max(worst, _max_abs_diff(state, y["state"][idx]))
        for g, h in zip(x["param_groups"], y["param_groups"], strict=True):
            worst = max(worst, _max_abs_diff(g, h))
    return worst


def _per_step(log_dir: Path, tag: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for step, value in scalars(log_dir)[tag]:
        values[step] = value  # event files sort by creation time: a step replayed after resume overwrites the first
    return values


def resume_deviation(straight: Path, resumed: Path) -> dict[str, object]:
    """How far a resumed run's end is from the uninterrupted run's (two version directories): final global steps,
    whether the same steps were logged, and the largest absolute differences of the final weights and buffers, the
    final optimiser state (AdamW moments and step counts), and the per-step training loss and learning rate."""
    a, b = _last(straight), _last(resumed)
    out: dict[str, object] = {
        "global_step": (a["global_step"], b["global_step"]),
        "weights": _max_abs_diff(a["state_dict"], b["state_dict"]),
        "optimizer": _optimizer_diff(a["optimizer_states"], b["optimizer_states"]),
    }
    for tag, key in (("train/loss_step", "loss"), ("train/learning_rate", "lr")):
        x, y = _per_step(straight, tag), _per_step(resumed, tag)
        out[f"{key}_steps_logged"] = (len(x), len(y)) if x.keys() != y.keys() else len(x)
        out[key] = max(abs(x[s] - y[s]) for s in x.keys() & y.keys())
    return out


def resumed_exactly(deviation: dict[str, object]) -> bool:
    """The same steps, and bitwise the same weights, optimiser state and per-step losses and learning rates."""
    steps = deviation["global_step"]
    return (
        steps[0] == steps[1]
        and not isinstance(deviation["loss_steps_logged"], tuple)
        and not isinstance(deviation["lr_steps_logged"], tuple)
        and all(deviation[k] == 0.0 for k in ("weights", "optimizer", "loss", "lr"))
    )


@pytest.mark.slow
@pytest.mark.parametrize("config", ["madpo.yaml", "beta_dpo.yaml", "reward.yaml", "reward.yaml+lora-dropout"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(config, resume_runs):
    """Resume is exact: bitwise the same weights (and β-DPO's EMA buffers), optimiser state and per-step losses as a
    run that was never interrupted (same machine, same thread count)."""
    straight, killed = resume_runs.straight_and_killed(config)
    assert _last(killed)["global_step"] == KILL_AT - 1  # really killed, mid-epoch, after the step-8 checkpoint
    resumed = resume_runs.resume_in_place(config)
    deviation = resume_deviation(straight, resumed)
    print(config, "resumed vs uninterrupted:", deviation)
    assert deviation["global_step"] == (12, 12) and deviation["loss_steps_logged"] == 12, deviation
    assert resumed_exactly(deviation), deviation


@pytest.mark.slow
@pytest.mark.parametrize("how", ["none", "optimizer_state", "lr_schedule", "skip_batch", "repeat_batch"])
def test_resume_check_flags_a_broken_resume(how, resume_runs):
    """The resume check above is not vacuous: resuming with the optimiser state dropped, the LR schedule restarted, or
    a batch skipped or trained twice (tests.helpers.BreakResume) is flagged; the control (`none`) is not."""
    straight, _ = resume_runs.straight_and_killed("reward.yaml")
    resumed = resume_runs.resume_copy(
        "reward.yaml",
        f"broken-{how}",
        "--trainer.callbacks+=tests.helpers.BreakResume",
        f"--trainer.callbacks.how={how}",
    )
    deviation = resume_deviation(straight, resumed)
    print(how, "resumed vs uninterrupted:", deviation)
    assert resumed_exactly(deviation) == (how == "none"), deviation
    if how != "none":  # and not by a rounding-sized amount: the weights move by far more than float32 resolution
        assert deviation["weights"] > 1e-5, deviation


def test_checkpoint_with_a_pickled_payload_is_refused(tmp_path):
    """Checkpoints load with weights_only=True: an object that would run code on unpickling is refused."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {}, "hook": Payload()}, f, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    from madpo.modules import PolicyLightningModule

    with pytest.raises(pickle.UnpicklingError):
        PolicyLightningModule.load_from_checkpoint(path, weights_only=True)
