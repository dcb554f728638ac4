"""Callbacks every madpo Trainer gets."""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from madpo.distributed import is_initialized
from madpo.errors import UserError
from madpo.sharding import is_sharded, local_tensor, reshard

log = logging.getLogger(__name__)


class DestroyProcessGroup(L.Callback):
    """Destroy the process group when a stage ends.

    Lightning registers `destroy_process_group` at exit only for NCCL; a gloo group left alive makes about one CPU DDP
    run in six abort at interpreter exit (SIGABRT). Lightning re-initialises the group if another stage follows.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class LatestCheckpoint(ModelCheckpoint):
    """`last.ckpt`: the latest training state, rewritten at every point where Lightning checkpoints, for
    `--ckpt_path last` (the CLI's `last_checkpoint`, beside its best-on-val/loss `checkpoint`). A class of its own
    so that its state key differs from the other ModelCheckpoint's even when both monitor nothing."""

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "last",
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        save_weights_only: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            save_weights_only=save_weights_only,
        )


class KeepBestWeights(L.Callback):
    """Keep a copy of the trainable weights at the best `monitor` value seen at validation, and put them back when
    fit ends, before the module exports (callbacks' `on_fit_end` runs before the module's).

    With `EarlyStopping` this is the paper's reward-model protocol (validate every n updates, patience 3, keep the
    best). The copy lives in CPU memory and holds only parameters that train (a LoRA adapter and head, or the whole
    model under full fine-tuning); under sharding each rank keeps only its own shards. The monitored metric must be
    identical on every rank (madpo's val metrics are gathered), so every rank keeps the same step.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"KeepBestWeights: mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self._state: dict[str, torch.Tensor] | None = None

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"KeepBestWeights: metric {self.monitor!r} was not logged at validation; logged: "
                f"{sorted(trainer.callback_metrics)}"
            )
        value = float(value)
        if math.isfinite(value) and self._better(value):
            self.best, self.best_step = value, trainer.global_step
            self.best_metrics = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1
            }
            # this rank's part of each parameter (its shard when sharded: each rank keeps and restores its own)
            reshard(pl_module)
            self._state = {
                name: local_tensor(p.detach()).to("cpu", copy=True)
                for name, p in pl_module.named_parameters()
                if p.requires_grad
            }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is None:
            return
        reshard(pl_module)
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            for name, saved in self._state.items():
                local_tensor(params[name]).copy_(saved)
        log.info("restored the weights of step %d (%s = %.4f)", self.best_step, self.monitor, self.best)
        print(
            f"[madpo] restored the best weights: step {self.best_step}, {self.monitor} = {self.best:.4f} "
            f"(fit ended at step {trainer.global_step})"
        )


class PairThroughput(L.Callback):
    """Logs `train/pairs_per_sec` and `train/tokens_per_sec` (real, non-pad tokens) over each logging window.

    Measured from wall time between training batches on rank 0, scaled by the world size (every rank trains the same
    number of pairs per step).
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._pairs = 0
        self._tokens = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int
    ) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict, batch_idx: int
    ) -> None:  # noqa: ANN001
        self._pairs += int(batch["index"].numel()) * trainer.world_size
        self._tokens += int(batch["attention_mask"].sum()) * trainer.world_size
        if (trainer.global_step % max(1, trainer.log_every_n_steps)) != 0 or self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            pl_module.log("train/pairs_per_sec", self._pairs / elapsed, on_step=True, on_epoch=False, batch_size=1)
            pl_module.log("train/tokens_per_sec", self._tokens / elapsed, on_step=True, on_epoch=False, batch_size=1)
        self._start, self._pairs, self._tokens = time.perf_counter(), 0, 0


class SampleGenerations(L.Callback):
    """Every `every_n_steps`, sample a continuation for each fixed prompt and log them to TensorBoard as text.

    Off by default; enable with `--trainer.callbacks+=madpo.callbacks.SampleGenerations
    --trainer.callbacks.prompts='["The movie was", ...]'`.

    Args:
        prompts: prompts to continue (the same ones every time, so the text panel shows the policy drifting).
        every_n_steps: how often, in optimiser steps.
        max_new_tokens: length of each continuation.
        do_sample: sample (True) or greedy (False).
        seed: sampling seed (the same each time, so differences come from the policy).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        every_n_steps: int = 100,
        max_new_tokens: int = 32,
        do_sample: bool = True,
        seed: int = 0,
    ) -> None:
        self.prompts = prompts or ["This movie was", "I rented this film because"]
        self.every_n_steps, self.max_new_tokens, self.do_sample, self.seed = (
            every_n_steps,
            max_new_tokens,
            do_sample,
            seed,
        )

    def generate(self, pl_module: L.LightningModule) -> list[str]:
        from madpo.modeling import load_tokenizer
        from madpo.pipeline.generate import sample_continuations

        tokenizer = load_tokenizer(pl_module.hparams.model_name_or_path)
        was_training = pl_module.model.training
        pl_module.model.eval()
        try:
            samples = sample_continuations(
                pl_module.model,
                tokenizer,
                self.prompts,
                num_samples=1,
                max_new_tokens=self.max_new_tokens,
                batch_size=len(self.prompts),
                seed=self.seed,
                device=pl_module.device,
                progress=False,
                **({} if self.do_sample else {"top_k": 1}),
            )
        finally:
            pl_module.model.train(was_training)
        return [s[0] for s in samples]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_sharded(pl_module.model):  # rank 0 alone would run forwards that need every rank's shards
            raise UserError("SampleGenerations does not run on a sharded model; drop the callback under FSDP")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict, batch_idx: int
    ) -> None:  # noqa: ANN001
        step = trainer.global_step
        if step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        texts = self.generate(pl_module)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            table = "\n\n".join(f"**{p}** {c}" for p, c in zip(self.prompts, texts, strict=True))
            experiment.add_text("samples", table, global_step=step)
