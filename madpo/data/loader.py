"""A training DataLoader whose position inside the epoch is part of the checkpoint.

Lightning saves `state_dict()` of any DataLoader that has one with the fit loop and calls `load_state_dict()` on
resume; without it, a run killed mid-epoch would restart the epoch's data from the beginning and train some pairs
twice. The sampler is an epoch-seeded `DistributedSampler` (permutation = f(seed, epoch)), so the order itself needs
no state: only how many batches of the current epoch were trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` that can resume inside an epoch: `resume_at(epoch, samples)` makes the next iteration of
    that epoch start `samples` in (this rank's share). The check happens when iteration really starts, after
    Lightning's `set_epoch`, so a checkpoint taken at an epoch's end resumes the next epoch from its start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, samples: int) -> None:
        self._resume = (epoch, samples)

    def epoch_order(self) -> list[int]:
        """This rank's dataset positions for the current epoch, from its start (a pending resume does not cut it)."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            indices = indices[resume[1] :]
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` whose state is (epoch, batches trained in that epoch).

    Args:
        batches_trained: returns how many batches of the current epoch have been trained (the DataModule reads it
            from the Trainer's progress, which counts trained batches, not what a prefetcher pulled).
    """

    def __init__(self, *args: Any, batches_trained: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs a ResumableSampler")
        self._batches_trained = batches_trained or (lambda: 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches_trained": int(self._batches_trained())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(int(state["epoch"]), int(state["batches_trained"]) * int(self.batch_size))
