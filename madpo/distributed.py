"""Rank helpers for code that runs with or without `torch.distributed`: every one is a no-op (rank 0 of 1) when no
process group is initialised, so the same call works in a single process, under DDP and outside any Trainer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def is_initialized() -> bool:
    """Whether a `torch.distributed` process group exists (it may hold a single process)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """`(rank, world size)` of this process in the default process group; `(0, 1)` without one."""
    if is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def get_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return rank_and_world()[0]


def get_world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return rank_and_world()[1]


def launcher_rank() -> int:
    """This process's global rank before (or without) a process group: as Lightning sets it, else as launchers
    export it (`RANK`, `LOCAL_RANK`); 0 for a plain process. For printing once, e.g. an error message."""
    try:
        from lightning.pytorch.utilities import rank_zero_only

        return int(getattr(rank_zero_only, "rank", 0) or 0)
    except ImportError:  # pragma: no cover - lightning is a dependency
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def all_gather_object(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` (any picklable object); `[obj]` without a process group. Collective:
    every rank must call it."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_world_size() > 1:
        torch.distributed.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (it fills a shared cache, e.g. `datasets`'), then the other ranks (they read it).
    Every rank must enter it."""
    rank, world = rank_and_world()
    if world > 1 and rank != 0:
        barrier()
    try:
        yield
    finally:
        if world > 1 and rank == 0:
            barrier()
