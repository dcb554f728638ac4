"""Interrupted runs resume exactly; checkpoints carrying pickled payloads are refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.helpers import run_cli_subprocess, scalars, tiny_args

STEPS = (
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--checkpoint.every_n_train_steps=2",
)


def _per_step(log_dir) -> dict[int, float]:
    values: dict[int, float] = {}
    for step, value in scalars(log_dir)["train/loss_step"]:
        values[step] = value  # a replayed step after resume overwrites the interrupted one
    return values


@pytest.mark.slow
@pytest.mark.parametrize("config", ["madpo.yaml", "beta_dpo.yaml", "reward.yaml"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(config, tmp_path, random_reward_model):
    extra = [*STEPS]
    if config == "madpo.yaml":
        extra.append(f"--data.reward_model={random_reward_model}")
    run_cli_subprocess(tiny_args(config, tmp_path, *extra, name="straight"))
    killed = tiny_args(
        config,
        tmp_path,
        *extra,
        "--trainer.callbacks+=tests.helpers.KillAtStep",
        "--trainer.callbacks.step=9",
        name="killed",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *killed], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-3000:]  # really killed, mid-epoch (epoch 2, batch 4 of 6)
    ckpt_dir = tmp_path / "runs" / "killed" / "version_0" / "checkpoints"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 8
    run_cli_subprocess(tiny_args(config, tmp_path, *extra, "--ckpt_path=last", name="killed"))
    straight = torch.load(tmp_path / "runs/straight/version_0/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 12
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    a, b = _per_step(tmp_path / "runs" / "straight"), _per_step(tmp_path / "runs" / "killed")
    assert sorted(a) == sorted(b) == list(range(12))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


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
