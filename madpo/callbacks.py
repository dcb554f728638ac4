"""Callbacks every madpo Trainer gets."""

from __future__ import annotations

import time

import lightning as L
import torch


class DestroyProcessGroup(L.Callback):
    """Destroy the process group when a stage ends.

    Lightning registers `destroy_process_group` at exit only for NCCL; a gloo group left alive makes about one CPU DDP
    run in six abort at interpreter exit (SIGABRT). Lightning re-initialises the group if another stage follows.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


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
