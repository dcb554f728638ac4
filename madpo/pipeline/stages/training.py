"""The one training helper every training stage uses: `fit` (one `lightning.Trainer` per stage) with the optimiser
options, seeding and in-memory datasets it trains on. It reads the trainer settings from a `TrainingSettings` (part
of the stage's inputs, so of its key) and only the progress-bar switch from the unhashed `Context`."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from madpo.pipeline.stages.base import Context, TrainingSettings


def quiet_libraries() -> None:
    """Keep the console to the pipeline's lines and the progress bars that matter (training, sampling): no
    weight-loading bars or load reports from transformers, no per-map bars from datasets, no Lightning chatter."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    quiet_lightning()


def quiet_lightning() -> None:
    for pattern in (
        r".*does not have many workers.*",
        r".*The number of training batches .* is smaller than the logging interval.*",
        r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fit(
    ctx: Context,
    training: TrainingSettings,
    stage_dir: Path,
    module: Any,
    train: Any,
    val: Any | None,
    *,
    tokenizer: str,
    max_length: int,
    max_prompt_length: int,
    batch_size: int,
    seed: int,
    epochs: int,
    max_steps: int | None,
    accumulate_grad_batches: int = 1,
    val_every_n_steps: int | None = None,
    early_stopping_patience: int | None = None,
    group_by_length: bool = False,
) -> tuple[dict, Any]:
    """Train `module` on the rows `train` (validating on `val`, a `datasets.Dataset` or None) through
    `PreferenceDataModule` and one `lightning.Trainer` (TensorBoard under the stage dir, progress bar,
    `DestroyProcessGroup`), validating once at the end, or every `val_every_n_steps` optimiser steps keeping the
    best weights (lowest val/loss) and optionally stopping early; `group_by_length`: batches of similar lengths (the
    DataModule's option: less padding). Every training stage trains through it. Returns
    (the final metrics and the data statistics, the DataModule)."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from madpo.callbacks import DestroyProcessGroup, KeepBestWeights, PairThroughput
    from madpo.data import PreferenceDataModule

    quiet_lightning()
    n_train_rows, has_val = len(train), val is not None
    if n_train_rows < 1:
        raise ValueError("no training rows")
    datamodule = PreferenceDataModule.from_datasets(
        train,
        val,
        tokenizer=tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
        seed=seed,
        cache_dir=str(ctx.cache_dir),
        group_by_length=group_by_length,
    )
    batches_per_epoch = math.ceil(n_train_rows / batch_size)
    total_batches = epochs * batches_per_epoch
    if max_steps:
        total_batches = min(total_batches, max_steps * accumulate_grad_batches)
    callbacks: list[Any] = [DestroyProcessGroup(), PairThroughput()]
    if ctx.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 25))
    if early_stopping_patience is not None and not val_every_n_steps:
        raise ValueError("early_stopping_patience needs val_every_n_steps (validation during training)")
    val_interval = total_batches
    keep_best = None
    if has_val and val_every_n_steps:
        val_interval = min(total_batches, val_every_n_steps * accumulate_grad_batches)
        keep_best = KeepBestWeights(monitor="val/loss", mode="min")
        callbacks.append(keep_best)
        if early_stopping_patience is not None:
            callbacks.append(
                EarlyStopping(
                    monitor="val/loss", mode="min", patience=early_stopping_patience, check_on_train_epoch_end=False
                )
            )
    trainer = L.Trainer(
        accelerator=training.accelerator,
        devices=training.devices,
        precision=training.precision,
        max_epochs=epochs,
        max_steps=max_steps or -1,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=training.gradient_clip_val,
        logger=TensorBoardLogger(save_dir=str(stage_dir), name="tensorboard", version=0, default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=ctx.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=val_interval if has_val else None,
        limit_val_batches=1.0 if has_val else 0,
        log_every_n_steps=min(training.log_every_n_steps, max(1, total_batches // accumulate_grad_batches)),
        default_root_dir=str(stage_dir),
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 0)() == 1}
    best = {}
    if keep_best is not None and keep_best.best_step is not None:
        # the exported weights are the best ones: report their validation metrics, and the last ones beside them
        best = {
            "best_step": keep_best.best_step,
            "last_val_metrics": {k: metrics.get(k) for k in keep_best.best_metrics},
        }
        metrics.update(keep_best.best_metrics)
    result = {
        "metrics": {k: metrics[k] for k in sorted(metrics)},
        **best,
        "global_step": int(trainer.global_step),
        "epochs_run": int(trainer.current_epoch),
        "data": datamodule.stats,
    }
    return result, datamodule


def optimizer_options(training: TrainingSettings, lr: float, warmup_ratio: float, schedule: str = "cosine") -> Any:
    from madpo.modules.base import OptimizerOptions

    # Lightning refuses gradient clipping with a fused optimizer under mixed precision: use the foreach AdamW there
    fused = False if "mixed" in training.precision and training.gradient_clip_val else None
    return OptimizerOptions(lr=lr, warmup_ratio=warmup_ratio, schedule=schedule, fused=fused)


def trainer_scoring_context(training: TrainingSettings) -> tuple[Any, Any, str]:
    """The (device, forward context, precision) that `fit`'s Trainer gives the DataModule's scoring, read off a
    Trainer built with the same accelerator, devices and precision: margins scored before `fit` then equal, and share
    the cache of, margins the DataModule would score inside it."""
    import lightning as L

    from madpo.scoring import scoring_context

    quiet_lightning()
    trainer = L.Trainer(
        accelerator=training.accelerator,
        devices=training.devices,
        precision=training.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return scoring_context(trainer)


def seed_everything(seed: int) -> None:
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)


def dataset(rows: Sequence[dict], columns: Sequence[str]) -> Any:
    import datasets

    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
