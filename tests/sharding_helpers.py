"""Callbacks for the sharded tests' CLI subprocesses (`--trainer.callbacks+=tests.sharding_helpers.SkipGradSync`).

Like tests.helpers, this module must not change how a run computes when imported: it does not import tests.conftest
(whose `torch.set_num_threads(1)` would give only the runs carrying these callbacks another matmul reduction order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter


class _LocalReduceScatter(DefaultReduceScatter):
    """A reduce-scatter that reduces nothing: each rank keeps its own gradient for its shard (scaled by the world
    size, so that FSDP's division afterwards leaves this rank's gradient as it was)."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: object,
        async_op: bool = False,
    ) -> None:
        world, rank = group.size(), group.rank()
        output_tensor.copy_(input_tensor.view(world, -1)[rank] * world)
        return None


class SkipGradSync(Callback):
    """A deliberately broken sharded run: gradients are never synchronised across ranks, so each rank updates its
    shards from its own half of the global batch (what a missing all-reduce does under DDP)."""

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        roots = list(getattr(pl_module, "_sharded_root", []))
        units = [m for root in roots for m in root.modules() if isinstance(m, FSDPModule)]
        assert units, "SkipGradSync needs a sharded run (configs/trainer/fsdp2_cpu.yaml)"
        for unit in units:
            unit.set_custom_reduce_scatter(_LocalReduceScatter())
