"""Sharded training past one device: FSDP2 (`fully_shard`) under Lightning's `ModelParallelStrategy`, and the helpers
that let whole-model code (export, best-weights snapshots, optimiser groups) work whether parameters are plain
tensors, FSDP2 `DTensor`s or FSDP1 views.

Why FSDP2 through `ModelParallelStrategy`: Lightning's `FSDPStrategy` (FSDP1) refuses a CPU accelerator, so it cannot
be tested on a machine without GPUs, while `ModelParallelStrategy` builds its device mesh from the device type (gloo on
CPU, NCCL on GPU) and leaves the parallelisation to the module's `configure_model`, which calls `shard_model` here.
The CPU test path and the GPU path (configs/trainer/fsdp2_gpu.yaml) are the same code. See docs/sharding.md.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from madpo.errors import UserError

# wrapper prefixes FSDP1, activation checkpointing and torch.compile insert into parameter names
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without the wrapper modules' parts, i.e. as the unwrapped module names it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as pure data parallelism: a 1-D mesh of every rank of every node (FSDP2), whatever
    `num_nodes` and `devices` are. The parent's `data_parallel_size: auto` means num_nodes (and its tensor-parallel
    size the devices per node), which a YAML file cannot turn into num_nodes x devices.

    Args:
        save_distributed_checkpoint: Each rank writes its shard into a checkpoint directory (True), or rank 0 gathers
            and writes one file (False; the whole model and optimiser state pass through rank 0's memory).
        process_group_backend: None: NCCL on GPU, gloo on CPU.
        timeout: Collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def uses_fully_shard(trainer: Any) -> bool:
    """Whether this Trainer's strategy expects the module to shard itself in `configure_model` (FSDP2)."""
    return trainer is not None and isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def data_parallel_mesh(strategy: Any) -> Any:
    """The strategy's 1-D data-parallel mesh, refusing a tensor-parallel split: madpo's DataModule gives every rank its
    own rows (it shards by world size), which only matches a mesh where every rank is a data-parallel replica."""
    mesh = strategy.device_mesh
    tp = mesh["tensor_parallel"].size()
    if tp != 1:
        raise UserError(
            f"ModelParallelStrategy with tensor_parallel_size={tp}: madpo shards data-parallel only (FSDP2); use "
            "madpo.sharding.FSDP2Strategy (configs/trainer/fsdp2_*.yaml), or set data_parallel_size to the world "
            f"size ({mesh.size()}) and tensor_parallel_size: 1"
        )
    return mesh["data_parallel"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, each its own FSDP unit: the classes transformers marks as not to be split
    (`_no_split_modules`, e.g. LlamaDecoderLayer), found through any peft wrapper."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"{type(model).__name__}: no decoder layer classes to shard (its _no_split_modules is {sorted(names)}); "
            "sharding needs a transformers model that declares them"
        )
    return layers


class ShardedRoot(nn.Module):
    """The FSDP2 root unit around the modules that are sharded: its forward runs any function, `root(fn, *args)`.

    madpo's log-probs and rewards do not go through the model's own forward: they call the decoder, then the head on
    selected positions (`madpo.modeling.sequence_logps`, `pair_rewards`). FSDP2 gathers a unit's parameters in that
    unit's forward, so the embeddings, final norm and head (the root's share) would still be shards there. Running
    the whole step inside this root's forward gathers them for all of it, whatever the step calls, and registers the
    backward hooks that reduce-scatter their gradients. It holds the modules without owning them: it is kept out of
    the LightningModule's tree, so parameter names and checkpoints are those of the unsharded module.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def shard_modules(modules: dict[str, nn.Module], mesh: Any) -> ShardedRoot:
    """`fully_shard` each decoder layer of each module, then one `ShardedRoot` around them all (the embeddings, final
    norms and heads: what no layer holds).

    Parameters become `DTensor`s sharded on dim 0 over `mesh`, in place: names, `requires_grad` (a frozen LoRA base
    beside trainable adapters, a frozen reference copy) and logical shapes stay as they were. Gradients are
    reduce-scattered, averaged over the ranks; on CPU (gloo has no AVG reduction) as a sum divided afterwards. The root
    reshards after its forward too (FSDP2 would keep it gathered until the backward), so outside a step every
    parameter is a shard, whichever loop ran last: what checkpoints, snapshots and exports read.
    """
    from torch.distributed.fsdp import fully_shard

    units: list[Any] = []
    for module in modules.values():
        for layer in decoder_layers(module):
            units.append(fully_shard(layer, mesh=mesh))
    root = fully_shard(ShardedRoot(modules), mesh=mesh, reshard_after_forward=True)
    units.append(root)
    if mesh.device_type == "cpu":
        for unit in units:
            unit.set_force_sum_reduction_for_comms(True)
    return root


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of a `DTensor`, else the tensor itself (a plain or FSDP1
    parameter is already this rank's storage)."""
    return t.to_local() if is_dtensor(t) else t


def reshard(module: nn.Module) -> None:
    """Register the sharded parameters again everywhere in `module`. FSDP2 keeps the root's parameters gathered after
    a forward that no backward follows (validation); code that reads parameters one by one must see the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` lives in shards across ranks (FSDP2 `DTensor` or FSDP1 flat parameter)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules()) or any(
        is_dtensor(p) for p in module.parameters()
    )


def full_state_dict(root: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The unsharded state dict of `root` (the strategy's model: a LightningModule, or FSDP1's wrapper of one) on CPU,
    keys under `prefix` with it stripped, on rank 0; `{}` on the other ranks.

    Collective: every rank must call it (each contributes its shards). Rank 0 holds the whole model in CPU memory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {clean_name(k)[len(prefix) :]: v for k, v in state.items() if clean_name(k).startswith(prefix)}


def load_distributed_checkpoint(path: str) -> dict[str, Any]:
    """A sharded (`torch.distributed.checkpoint`) Lightning checkpoint directory as one plain checkpoint dict: the full
    `state_dict` plus the metadata file (hyper_parameters, loops), in CPU memory, without a process group."""
    from pathlib import Path

    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(Path(path))
    if "state_dict" not in checkpoint and "model" in checkpoint:  # FSDPStrategy's sharded layout names it "model"
        checkpoint["state_dict"] = checkpoint.pop("model")
    optimizers = sorted(k for k in checkpoint if k.startswith("optimizer_") and k[len("optimizer_") :].isdigit())
    if optimizers:
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizers]
    return checkpoint
