"""Callbacks every madpo Trainer gets."""

from __future__ import annotations

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
