"""Shared test helpers: run the CLI in-process or in a subprocess, read TensorBoard event files back, callbacks that
interrupt or break a run.

This module is imported by CLI subprocesses that load its callbacks (`--trainer.callbacks+=tests.helpers.KillAtStep`),
so it must not change how a run computes: it does not import tests.conftest, whose `torch.set_num_threads(1)` would
make only the runs carrying such a callback single-threaded (a different matmul reduction order, ~1e-8 in the first
gradients, ~5e-6 in the weights after one AdamW step; see docs/reliability.md).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).parent.parent  # = tests.conftest.REPO, without importing conftest's process-wide settings


def tiny_args(config: str, tmp_path: Path, *extra: str, name: str = "run") -> list[str]:
    """`fit` arguments for a configs/tiny file, writing everything under tmp_path."""
    return [
        "fit",
        "-c",
        str(REPO / "configs" / "tiny" / config),
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--data.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this one's, offline, plus `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def run_cli_subprocess(
    args: list[str], cwd: Path = REPO, timeout: int = 300, env: dict[str, str] | None = None, returncode: int = 0
) -> subprocess.CompletedProcess:
    """`python cli.py *args` in a subprocess (environment `env`, default `cli_env()`); asserts its exit status."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=cwd,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under log_dir, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


class KillAtStep(Callback):
    """SIGKILLs its own process when training reaches `step` (an interrupted run, for resume tests); a step the run
    never reaches (e.g. -1) makes it a no-op, so the uninterrupted run can carry the same callbacks."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class BreakResume(Callback):
    """A deliberately broken resume, to show that a resume check catches it. On loading the checkpoint it:

    - `optimizer_state`: drops the optimiser's per-parameter state (AdamW moments and step counts; the param groups,
      hence the learning rate, are kept), as if the checkpoint had been saved without it;
    - `lr_schedule`: restarts the LR schedule at step 0 (the step being resumed still uses the saved learning rate);
    - `skip_batch` / `repeat_batch`: moves the training loader's saved position one batch forward / back, so one
      batch of the epoch is never trained / trained twice;
    - `none`: nothing (the control).
    """

    HOW = ("none", "optimizer_state", "lr_schedule", "skip_batch", "repeat_batch")

    def __init__(self, how: str = "none") -> None:
        if how not in self.HOW:
            raise ValueError(f"BreakResume: how must be one of {self.HOW}, got {how!r}")
        self.how = how

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:  # noqa: ANN001
        if self.how == "optimizer_state":
            for state in checkpoint["optimizer_states"]:
                assert state["state"], "no optimizer state to drop"
                state["state"] = {}
        elif self.how == "lr_schedule":
            for state in checkpoint["lr_schedulers"]:
                assert state["last_epoch"] > 0, state
                state["last_epoch"], state["_step_count"] = 0, 1
        elif self.how in ("skip_batch", "repeat_batch"):
            loaders = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
            assert loaders and all("batches_trained" in s for s in loaders), loaders
            for state in loaders:
                state["batches_trained"] += 1 if self.how == "skip_batch" else -1
                assert state["batches_trained"] >= 0, state


def load_bench_script(name: str, monkeypatch: Any) -> ModuleType:
    """`bench/<name>.py` as a module (bench scripts are not a package), registered in `sys.modules` for the test's
    duration: dataclasses look their module up there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
