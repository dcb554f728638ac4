"""`PreferenceCollator`: tokenized rows -> the batch of docs/contracts.md.

For preference rows the batch stacks 2B sequences, rows [0, B) = prompt+chosen and rows [B, 2B) = prompt+rejected, so
one forward serves both; SFT rows (no `rejected_ids`) give B sequences. Sequences are right-padded to the batch's
longest, rounded up to `pad_to_multiple_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch

FLOAT_COLUMNS = ("rm_margin", "weight", "margin", "ref_chosen_logps", "ref_rejected_logps")


def _ids(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


class PreferenceCollator:
    """Callable turning a list of tokenized rows into a padded batch.

    Args:
        pad_token_id: id written into padding positions (`tokenizer.pad_token_id`).
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for tensor cores); None = no
            rounding.

    Returns a dict with `input_ids` (R, T) long, `attention_mask` (R, T) long, `completion_mask` (R, T) bool (True
    exactly on completion tokens), `index` (B,) long, and float32 (B,) `rm_margin` / `weight` / `margin` /
    `ref_chosen_logps` / `ref_rejected_logps` when the rows carry them. R = 2B for preference rows, B for SFT rows.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer needs a pad token (load_tokenizer sets one)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad_token_id={self.pad_token_id}, pad_to_multiple_of={self.pad_to_multiple_of})"

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        pairs = "rejected_ids" in features[0]
        prompts = [_ids(f["prompt_ids"]) for f in features]
        completions = [_ids(f["chosen_ids"]) for f in features]
        if pairs:
            completions += [_ids(f["rejected_ids"]) for f in features]
            prompts = prompts + prompts
        prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        total_len = prompt_len + torch.tensor([len(c) for c in completions], dtype=torch.long)
        width = int(total_len.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        positions = torch.arange(width).unsqueeze(0)
        real = positions < total_len.unsqueeze(1)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        # row-major boolean assignment writes each row's prompt+completion tokens left to right
        input_ids[real] = torch.tensor(
            list(chain.from_iterable(chain(p, c) for p, c in zip(prompts, completions, strict=True))), dtype=torch.long
        )
        batch = {
            "input_ids": input_ids,
            "attention_mask": real.long(),
            "completion_mask": real & (positions >= prompt_len.unsqueeze(1)),
            "index": torch.tensor([int(f["index"]) for f in features], dtype=torch.long),
        }
        for name in FLOAT_COLUMNS:
            if name in features[0]:
                batch[name] = torch.tensor([float(f[name]) for f in features], dtype=torch.float32)
        return batch


def collate_prompts(features: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Prompt rows (generation) -> `index` (B,) long, `prompt_ids` (lists of ids; the step pads them for generation)
    and `prompt` (the prompts as given, for the output)."""
    if not features:
        raise ValueError("cannot collate an empty batch")
    return {
        "index": torch.tensor([int(f["index"]) for f in features], dtype=torch.long),
        "prompt_ids": [_ids(f["prompt_ids"]) for f in features],
        "prompt": [f["prompt"] for f in features],
    }
