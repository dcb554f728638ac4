"""Shared test helpers: run the CLI in-process or in a subprocess, read TensorBoard event files back."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from tests.conftest import REPO


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


def run_cli_subprocess(args: list[str], cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
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
    """SIGKILLs its own process when training reaches `step` (an interrupted run, for resume tests)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
