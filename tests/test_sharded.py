"""2-process FSDP2 on CPU (configs/trainer/fsdp2_cpu.yaml, gloo) against one process on the same global batch:
training, resume from a sharded checkpoint, export (at the end of fit, and `cli.py export` of a sharded checkpoint).

Tolerance. Sharding changes how each step's gradient is summed: each rank sums over its half of the pairs and the
halves are reduce-scattered. The noise floor of that is measured here, not assumed: one process training the same
pairs as two accumulated half-batches (the same split of each step's sum, no process group) differs from one process
on the whole batch by `floor` in the weights after the run (AdamW turns reduction-order rounding of near-zero
gradients into differences far above float epsilon). Sharded runs must stay within 10 x floor of the one-process run;
a sharded run whose gradients are not synchronised across ranks (tests.sharding_helpers.SkipGradSync) lands more than
100 x floor away, so the check is far from blind to a broken sync.

Every run is shared by the tests of this module (a few tiny runs of 3 steps, each distributed one in a subprocess).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from madpo.cli import cli_main
from madpo.sharding import load_distributed_checkpoint
from tests.conftest import REPO
from tests.helpers import cli_env, run_cli_subprocess, scalars, tiny_args

pytestmark = pytest.mark.slow

COMMON = (
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
)
# validate and checkpoint after every step (the best on val/loss, which rises here, and last.ckpt, the latest); keep
# the best val/loss weights, which here are step 1's, so the export is not the last step's weights: KeepBestWeights
# is exercised on shards too
EVERY_STEP = (
    "--trainer.val_check_interval=1",
    "--checkpoint.save_on_train_epoch_end=false",
    "--trainer.callbacks+=madpo.callbacks.KeepBestWeights",
    "--trainer.callbacks+=tests.helpers.KillAtStep",
)
SHARDED = ("--trainer", str(REPO / "configs/trainer/fsdp2_cpu.yaml"), "--data.batch_size=4")


def _sharded(tmp: Path, name: str, *extra: str, kill_at: int = -1) -> str:
    args = tiny_args("dpo.yaml", tmp, *COMMON, *EVERY_STEP, f"--trainer.callbacks.step={kill_at}", *extra, name=name)
    proc = run_cli_subprocess([*args, *SHARDED], env=cli_env(OMP_NUM_THREADS="1"), returncode=-9 if kill_at > 0 else 0)
    return proc.stdout + proc.stderr


def _ckpt(tmp: Path, name: str) -> dict:
    path = tmp / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"
    return load_distributed_checkpoint(str(path)) if path.is_dir() else torch.load(path, weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def unsharded(tmp) -> float:
    """One process on 8 pairs a step (the reference), and the same pairs as 2 accumulated micro-batches of 4: their
    weight difference is the floor."""
    cli_main(
        tiny_args(
            "dpo.yaml", tmp, *COMMON, *EVERY_STEP, "--trainer.callbacks.step=-1", "--data.batch_size=8", name="single"
        )
    )
    accumulated = tiny_args(
        "dpo.yaml",
        tmp,
        *COMMON[:1],
        "--trainer.limit_train_batches=6",
        "--trainer.limit_val_batches=1",
        "--trainer.accumulate_grad_batches=2",
        "--data.batch_size=4",
        name="accumulated",
    )
    cli_main(accumulated)
    floor = _max_diff(_ckpt(tmp, "single")["state_dict"], _ckpt(tmp, "accumulated")["state_dict"])
    print(f"noise floor (1 process: whole batch vs 2 accumulated halves), max |dw|: {floor:.3g}")
    assert 0 < floor < 1e-4, floor  # 0 would mean the floor measures nothing; 1e-4 that accumulation is broken
    return floor


@pytest.fixture(scope="module")
def sharded(tmp) -> str:
    return _sharded(tmp, "sharded")


def test_sharded_training_equals_one_process(tmp, unsharded, sharded):
    floor, tol = unsharded, 10 * unsharded
    single, fsdp = _ckpt(tmp, "single"), _ckpt(tmp, "sharded")
    assert single["global_step"] == fsdp["global_step"] == 3
    diff = _max_diff(single["state_dict"], fsdp["state_dict"])
    _sharded(tmp, "broken", "--trainer.callbacks+=tests.sharding_helpers.SkipGradSync")
    broken = _max_diff(single["state_dict"], _ckpt(tmp, "broken")["state_dict"])
    print(f"max |dw| vs 1 process: sharded {diff:.3g}, unsynchronised {broken:.3g} (floor {floor:.3g}, tol {tol:.3g})")
    assert diff <= tol
    assert broken > 10 * tol
    # the weight-decay groups found the same parameters through the DTensors (a misfiled matrix moves weights by
    # lr * wd * w per step, below the floor, so it is counted here rather than left to the weights)
    groups = [len(g["params"]) for g in single["optimizer_states"][0]["param_groups"]]
    assert [len(g["params"]) for g in fsdp["optimizer_states"][0]["param_groups"]] == groups
    assert all(groups)
    # per-step losses: weights within the floor move a loss by < 1e-6; the unsynchronised run moves it by > 1e-3
    a, b, c = scalars(tmp / "runs/single"), scalars(tmp / "runs/sharded"), scalars(tmp / "runs/broken")
    for tag in ("train/loss_step", "val/loss", "train/rewards/margins_step"):
        assert tag in a and tag in b, tag
        ref = [v for _, v in a[tag]]
        assert len(ref) == 3 and [v for _, v in b[tag]] == pytest.approx(ref, abs=1e-5), tag
    assert max(abs(x - y) for (_, x), (_, y) in zip(a["val/loss"], c["val/loss"], strict=True)) > 1e-3


def test_sharded_resume_equals_uninterrupted(tmp, unsharded, sharded):
    """Killed after 2 of 3 steps (SIGKILL: no teardown), resumed from the sharded last.ckpt with --ckpt_path last."""
    _sharded(tmp, "resumed", kill_at=2)
    assert _ckpt(tmp, "resumed")["global_step"] == 2
    out = _sharded(tmp, "resumed", "--ckpt_path=last")
    assert "Restored all states from the checkpoint" in out
    resumed, uninterrupted = _ckpt(tmp, "resumed"), _ckpt(tmp, "sharded")
    assert resumed["global_step"] == 3
    diff = _max_diff(resumed["state_dict"], uninterrupted["state_dict"])
    print(f"resumed vs uninterrupted sharded run, max |dw|: {diff:.3g} (floor {unsharded:.3g})")
    assert diff <= unsharded
    # AdamW's moments and step counts came back from the shards
    moments = [
        {f"{k}.{n}": v for k, s in c["optimizer_states"][0]["state"].items() for n, v in s.items()}
        for c in (resumed, uninterrupted)
    ]
    assert moments[0] and _max_diff(*moments) <= unsharded
    steps = scalars(tmp / "runs/resumed")["train/loss_step"]  # both runs' events: steps 0, 1 then 2 after the resume
    assert [s for s, _ in steps] == [0, 1, 2]
    want = [v for _, v in scalars(tmp / "runs/sharded")["train/loss_step"]]
    assert [v for _, v in steps] == pytest.approx(want, abs=1e-6)


def test_sharded_export_equals_unsharded_export(tmp, unsharded, sharded):
    """fit's export (every rank gathers, rank 0 writes) and `cli.py export` of the sharded checkpoint directory both
    equal their one-process counterparts and load with plain transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from madpo.export import export_checkpoint

    tol = 10 * unsharded
    assert "restored the best weights: step 1" in sharded  # KeepBestWeights put the shards of step 1 back
    exported = {}
    for name in ("single", "sharded"):
        fit_dir = tmp / "runs" / name / "version_0" / "hf_model"
        exported[name] = load_file(fit_dir / "model.safetensors")
        AutoModelForCausalLM.from_pretrained(fit_dir)
        ckpt_dir = export_checkpoint(
            str(tmp / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"), str(tmp / f"{name}_ckpt_export")
        )
        exported[f"{name}_ckpt"] = load_file(Path(ckpt_dir) / "model.safetensors")
    fit_diff = _max_diff(exported["single"], exported["sharded"])
    ckpt_diff = _max_diff(exported["single_ckpt"], exported["sharded_ckpt"])
    print(f"exports, sharded vs 1 process, max |dw|: fit {fit_diff:.3g}, from the checkpoint {ckpt_diff:.3g}")
    assert fit_diff <= tol and ckpt_diff <= tol
    # the fit export holds step 1's weights, the checkpoint export step 3's: far apart, so the two checks above differ
    assert _max_diff(exported["sharded"], exported["sharded_ckpt"]) > 10 * tol
    last = {k.removeprefix("model."): v for k, v in _ckpt(tmp, "sharded")["state_dict"].items()}
    assert _max_diff({k: last[k] for k in exported["sharded_ckpt"]}, exported["sharded_ckpt"]) == 0
