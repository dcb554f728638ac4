"""2-process CPU DDP (gloo) equals 1 process on the same global batch: per-step losses, metrics and parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from madpo.cli import cli_main
from tests.conftest import DATA, REPO
from tests.helpers import cli_env, scalars, tiny_args

COMMON = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
)
CHECKED = (
    "train/loss_step",
    "train/rewards/accuracies_step",
    "train/rewards/margins_step",
    "val/loss",
    "train/madpo/weight_mean_step",
    "train/beta/effective_step",
    "train/rm/margin_mean_step",
)


LOSSES = ("sft", "dpo", "ipo", "beta_dpo", "madpo", "cdpo", "rdpo", "odpo", "margin_target", "hinge", "rpo")


UNEVEN = (
    *COMMON[:1],
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    f"--data.train_files={DATA / 'pairs_val.jsonl'}",
)
ACCUMULATION = (*COMMON[:1], "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1")


def cases(reward_model: str) -> dict[str, tuple[str, list[str], list[str]]]:
    """Case name -> (tiny config, the one-process run's extra args, the 2-rank run's) on the same global batch."""
    out = {}
    for loss in LOSSES:  # 8 pairs per step: 8 in one process, 4 per rank
        extra = [*COMMON]
        if loss in ("madpo", "odpo", "margin_target"):  # the losses that read the reward model's margin
            extra.append(f"--data.reward_model={reward_model}")
        out[loss] = (f"{loss}.yaml", [*extra, "--data.batch_size=8"], [*extra, "--data.batch_size=4"])
    # 64 pairs, 12 per step: the last step holds 4 pairs (2 per rank) in both runs
    out["uneven"] = ("dpo.yaml", [*UNEVEN, "--data.batch_size=12"], [*UNEVEN, "--data.batch_size=6"])
    for loss in ("sft", "beta_dpo"):  # 2 ranks x 2 micro-batches x 2 pairs = one process with 8 pairs
        out[f"accumulation-{loss}"] = (
            f"{loss}.yaml",
            [*ACCUMULATION, "--trainer.limit_train_batches=3", "--data.batch_size=8"],
            [
                *ACCUMULATION,
                "--trainer.limit_train_batches=6",
                "--trainer.accumulate_grad_batches=2",
                "--data.batch_size=2",
            ],
        )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, random_reward_model) -> Path:
    """Every case trained in this process and on 2 DDP ranks, all the DDP runs in one launch (tests/cli_runs.py), so
    that the ranks start once; case c's runs are under `<root>/c/runs/{single,ddp}`."""
    root = tmp_path_factory.mktemp("ddp")
    ddp_runs = []
    for name, (config, single, ddp) in cases(random_reward_model).items():
        cli_main(tiny_args(config, root / name, *single, name="single"))
        ddp_args = tiny_args(config, root / name, *ddp, name="ddp")
        ddp_runs.append([*ddp_args, "--trainer", str(REPO / "configs/trainer/ddp_cpu.yaml")])
    (root / "runs.json").write_text(json.dumps(ddp_runs))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cli_runs.py"), str(root / "runs.json")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root


@pytest.mark.slow
@pytest.mark.xdist_group("ddp_parity")  # under `pytest -n`: one worker runs the shared launch, not each
@pytest.mark.parametrize("loss", LOSSES)
def test_ddp_two_processes_equal_one_process(loss, runs):
    case = runs / loss / "runs"
    single = scalars(case / "single")
    ddp = scalars(case / "ddp")
    assert single["train/loss_step"] and [s for s, _ in single["train/loss_step"]] == [0, 1, 2]
    for tag in CHECKED:
        if tag not in single:
            continue
        assert tag in ddp, tag
        a, b = [v for _, v in single[tag]], [v for _, v in ddp[tag]]
        assert b == pytest.approx(a, rel=1e-4, abs=2e-5), tag  # rewards/margins cancel: absolute scale
    params_single = torch.load(case / "single/version_0/checkpoints/last.ckpt", weights_only=True)
    params_ddp = torch.load(case / "ddp/version_0/checkpoints/last.ckpt", weights_only=True)
    assert params_ddp["global_step"] == params_single["global_step"] == 3
    assert_params_match(params_single["state_dict"], params_ddp["state_dict"], steps=3, lr=1e-3)


def assert_params_match(single: dict, ddp: dict, *, steps: int, lr: float) -> None:
    """Equal to float noise, except at a few elements: where a gradient element is ~0, its two values differ only by
    reduction-order noise, and Adam's g/√v turns that noise into a step of up to lr. So all but 0.1 % of the elements
    must agree to rtol 1e-4 / atol 1e-5, and the rest to steps·lr (the furthest Adam can move them)."""
    for key, value in single.items():
        diff = (ddp[key] - value).abs()
        loose = diff > 1e-5 + 1e-4 * value.abs()
        assert loose.float().mean() <= 1e-3, (key, int(loose.sum()), diff.numel())
        assert float(diff.max()) <= steps * lr, (key, float(diff.max()))


@pytest.mark.slow
@pytest.mark.xdist_group("ddp_parity")
def test_ddp_uneven_final_batch_equals_one_process(runs):
    """64 pairs, 12 per global step: the last step holds 4 pairs (2 per rank) in both runs; nothing hangs or differs."""
    single, ddp = scalars(runs / "uneven" / "runs" / "single"), scalars(runs / "uneven" / "runs" / "ddp")
    assert [s for s, _ in single["train/loss_step"]] == list(range(6))
    assert [v for _, v in ddp["train/loss_step"]] == pytest.approx([v for _, v in single["train/loss_step"]], rel=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("ddp_parity")
@pytest.mark.parametrize("loss", ["sft", "beta_dpo"])
def test_ddp_with_gradient_accumulation_equals_one_large_batch(loss, runs):
    """2 ranks x 2 micro-batches x 2 pairs per optimiser step = one process with 8 pairs: SFT's token mean and
    β-DPO's EMA, mask and β span the whole step across ranks and micro-batches."""
    case = runs / f"accumulation-{loss}" / "runs"
    params_single = torch.load(case / "single/version_0/checkpoints/last.ckpt", weights_only=True)
    params_ddp = torch.load(case / "ddp/version_0/checkpoints/last.ckpt", weights_only=True)
    assert params_ddp["global_step"] == params_single["global_step"] == 3
    if loss == "beta_dpo":
        assert int(params_ddp["state_dict"]["loss.step"]) == 3  # one EMA update per optimiser step
    for key, value in params_single["state_dict"].items():
        torch.testing.assert_close(params_ddp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
