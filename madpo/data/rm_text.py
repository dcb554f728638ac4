"""Reward-model margins for rows tokenized with another tokenizer than the reward model's, scored from the text.

A reward model with its own backbone (an encoder such as BERT, another LM family) reads token ids of its own
vocabulary: its margins cannot be read off the policy's `prompt_ids`/`chosen_ids`/`rejected_ids`. The same validated
text rows (`RawData`, with their `index`) are therefore tokenized a second time with the reward model's tokenizer,
under the reward model's own length budget, scored (`madpo.scoring.attach_rm_margins`, cached under a key of those
token ids and that tokenizer) and the margins put on the policy-tokenized rows by `index`. Both `PreferenceDataModule`
and the pipeline's reward stage go through `attach_rm_margins_from_text`, so the two read one reward the same way.

Length rule: `rm_lengths(max_length)` = (max_length − 1, max_length): the prompt keeps its end and at least one
completion token is left, so no row the policy keeps is dropped for its length (the reward model's tokenizer may
split the same prompt into more tokens than the policy's budget allows).
"""

from __future__ import annotations

import os
from typing import Any

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from madpo.data.collate import PreferenceCollator
from madpo.data.formats import RawData
from madpo.data.tokenize import tokenize_dataset
from madpo.modeling import tokenizer_fingerprint
from madpo.scoring import ForwardContext, attach_rm_margins, set_column


def tokenizers_differ(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers may give different ids for the same text (vocabulary, special tokens, class)."""
    return tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


def rm_lengths(max_length: int) -> tuple[int, int]:
    """`(max_prompt_length, max_length)` of the reward model's own tokenization (the module docstring's rule)."""
    if max_length < 2:
        raise ValueError(f"the reward model's max_length must be >= 2, got {max_length}")
    return max_length - 1, max_length


def attach_rm_margins_from_text(
    tokenized: datasets.Dataset,
    raw: RawData,
    reward_model: nn.Module,
    rm_tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int,
    cache_dir: str | os.PathLike,
    precision: str = "32-true",
    model_fingerprint: str | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    forward_context: ForwardContext | None = None,
    stats: dict[str, Any] | None = None,
    split: str = "train",
) -> datasets.Dataset:
    """`tokenized` (rows tokenized from `raw`, any tokenizer) with the `rm_margin` of `reward_model` on the text of
    each row, tokenized with `rm_tokenizer` at (`max_prompt_length`, `max_length`). A row of `tokenized` that the
    reward model's tokenization drops (e.g. an empty prompt where that tokenizer has no BOS) stops it, naming the
    rows. DDP-collective like `attach_rm_margins`. `stats`, when given, gets `cache`, `mean`, `tokenizer` and the
    counts of the reward model's tokenization (`rm_tokenize`)."""
    rm_rows, tok_stats = tokenize_dataset(
        raw, rm_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, split=f"{split} (reward model)"
    )
    scored = attach_rm_margins(
        rm_rows,
        reward_model,
        PreferenceCollator(rm_tokenizer.pad_token_id),
        cache_dir=cache_dir,
        tokenizer=rm_tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        precision=precision,
        model_fingerprint=model_fingerprint,
        batch_size=batch_size,
        device=device,
        forward_context=forward_context,
        stats=stats,
    )
    by_index = dict(zip(scored["index"], scored["rm_margin"], strict=True))
    index = tokenized["index"]
    missing = [i for i in index if i not in by_index]
    if missing:
        raise ValueError(
            f"{split}: the reward model's tokenizer ({rm_tokenizer.name_or_path}) leaves rows {missing[:10]} without "
            f"a scorable pair ({len(missing)} of {len(index)}; its tokenization counts: {tok_stats.as_dict()})"
        )
    values = torch.tensor([by_index[i] for i in index], dtype=torch.float64)
    if stats is not None:  # the mean of the margins these rows get (the reward model may have scored more rows)
        stats["mean"] = float(values.mean()) if len(values) else float("nan")
        stats["tokenizer"] = f"the reward model's own ({rm_tokenizer.name_or_path})"
        stats["rm_tokenize"] = tok_stats.as_dict()
    return set_column(tokenized, "rm_margin", values)
