"""Length-grouped training order (`group_by_length=True`): batches of rows of similar lengths, still epoch-seeded,
resumable and the same global batches for any number of processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import torch
from torch.utils.data import DistributedSampler

from madpo.data.loader import ResumableSampler


def row_lengths(dataset: datasets.Dataset) -> list[int]:
    """Padded width each row needs in a batch: prompt + the longer completion (prompt + completion for SFT rows)."""
    import pyarrow.compute as pc

    table = dataset.with_format(None).data
    width = pc.list_value_length(table.column("prompt_ids"))
    completions = [c for c in ("chosen_ids", "rejected_ids") if c in dataset.column_names]
    longest = pc.list_value_length(table.column(completions[0]))
    for name in completions[1:]:
        longest = pc.max_element_wise(longest, pc.list_value_length(table.column(name)))
    return pc.add(width, longest).to_pylist()


def length_grouped_order(lengths: list[int], global_batch_size: int, seed: int, *, megabatch: int = 50) -> list[int]:
    """A seeded permutation of `range(len(lengths))` whose consecutive chunks of `global_batch_size` hold rows of
    similar lengths (HF's LengthGroupedSampler scheme, with the batch order shuffled).

    The seeded permutation is cut into mega-batches of `megabatch` global batches; each is sorted by length (longest
    first) and cut into global batches; the full batches are shuffled (same generator) with the one holding the
    longest row first, and a final partial batch stays last so every other batch stays whole.
    """
    n = len(lengths)
    generator = torch.Generator()
    generator.manual_seed(seed)
    perm = torch.randperm(n, generator=generator).tolist()
    mega = global_batch_size * megabatch
    batches: list[list[int]] = []
    for start in range(0, n, mega):
        chunk = sorted(perm[start : start + mega], key=lambda i: -lengths[i])  # stable: ties keep the seeded order
        batches += [chunk[i : i + global_batch_size] for i in range(0, len(chunk), global_batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < global_batch_size else []
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        first = batches.pop(longest)
        batches = [first] + [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in batches + tail for i in batch]


class _LengthGroupedOrder(DistributedSampler):
    """`DistributedSampler` whose epoch permutation is `length_grouped_order(..., seed + epoch)`; padding and the
    per-rank split (`indices[rank::world]`) are DistributedSampler's, so rank r's k-th batch is every world-th row of
    the k-th global batch and N ranks together see exactly the batches one process sees with an N-times batch."""

    def __init__(self, dataset: Any, *, lengths: list[int], global_batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, shuffle=True, drop_last=False, **kwargs)
        if len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(dataset)} rows")
        if global_batch_size % self.num_replicas:
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of {self.num_replicas} ranks")
        self.lengths, self.global_batch_size = list(lengths), global_batch_size

    def __iter__(self) -> Iterator[int]:
        indices = length_grouped_order(self.lengths, self.global_batch_size, self.seed + self.epoch)
        padding = self.total_size - len(indices)
        if padding > 0:  # as DistributedSampler pads (drop_last=False)
            indices += (indices * -(-padding // len(indices)))[:padding]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class LengthGroupedSampler(ResumableSampler, _LengthGroupedOrder):
    """The resumable training sampler of `group_by_length=True` (resume logic from `ResumableSampler`)."""
