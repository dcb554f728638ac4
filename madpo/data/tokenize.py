"""Tokenize validated rows once (`datasets.map(batched=True)`), with an explicit, counted truncation policy.

Output columns (docs/contracts.md): `index`, `prompt_ids`, `chosen_ids` (+ `rejected_ids` for preference rows), and
the optional numeric columns `rm_margin`, `weight` and `margin` carried through when present. Every other column is
removed.

**Boundary rule.** The prompt and each completion are tokenized *separately* (no special tokens added by the
tokenizer) and concatenated: `input = prompt_ids + completion_ids`. The prompt/completion boundary is therefore
exactly the boundary between the two strings, and the prompt tokens are identical for chosen and rejected. (Merging
across the boundary, e.g. "Hello" + " world" tokenized whole, is what this rule avoids; put the separating space at
the start of the completion, as TRL data does.)

**Special tokens.** BOS is prepended to the prompt when the tokenizer has one and the prompt does not already start
with it (so a tokenizer or chat template that adds it itself never yields two). EOS is appended to each standard
completion exactly once (not when it is already the last token). Conversational rows are rendered with the chat
template: prompt = template(prompt, add_generation_prompt=True), completion = the rest of
template(prompt + completion); the template's own end-of-turn tokens end the completion and no EOS is added
(TRL does the same; appending one would double it, trl#4481).

**Truncation.** 1) `max_prompt_length` truncates the prompt keeping its END (the tokens adjacent to the response);
a leading BOS is kept first. 2) Each completion keeps its START, cut to `max_length - len(prompt_ids)` (a cut
completion loses its EOS). 3) A row whose prompt leaves fewer than one completion token is filtered, as is a row with
an empty prompt (no BOS and no prompt text: the first completion token would have nothing to be predicted from).
Every truncation and filter is counted in `TokenizeStats` and logged.

**Cache.** `datasets.map` caches on disk for file-backed datasets. The `new_fingerprint` is built from the input
dataset's fingerprint, the tokenizer's fingerprint and chat template, the lengths and `TOKENIZE_VERSION`, so another
process reuses the cache and any change of input invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from madpo.data.formats import COMPLETION_FIELDS, PREFERENCE, RawData
from madpo.modeling import tokenizer_fingerprint

log = logging.getLogger(__name__)

TOKENIZE_VERSION = 2  # bump when the tokenization rules change: invalidates every datasets cache entry
_KEEP, _DROP_PROMPT_TOO_LONG, _DROP_EMPTY_PROMPT = 0, 1, 2


@dataclass
class TokenizeStats:
    """Counts of one tokenization pass (logged; never silent)."""

    rows_in: int = 0
    rows_out: int = 0
    prompts_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    filtered_prompt_too_long: int = 0
    filtered_empty_prompt: int = 0
    longest_prompt: int = 0  # tokens before truncation (with BOS), over every row
    longest_completion: int = 0  # tokens before truncation (with EOS), over every row and completion

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tokenize_fingerprint(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None,
    conversational: bool,
) -> str:
    """Deterministic fingerprint of the tokenized dataset (input fingerprint + tokenizer + lengths + rules)."""
    payload = {
        "data": dataset._fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None) if conversational else None,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "conversational": conversational,
        "version": TOKENIZE_VERSION,
    }
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).hexdigest()


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: list[dict]) -> str:
    """The text of a conversational prompt: the chat template with its generation prompt (the assistant turn's
    opening), which is where a completion starts, in training data and in generation alike."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational rows need a tokenizer with a chat template; this tokenizer has none")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _render_conversation(
    tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]], completions: list[list[dict]], indices: list[int]
) -> tuple[list[str], list[str]]:
    """(prompt text, completion text) of each conversational row, split at the generation prompt."""
    prompt_texts, completion_texts = [], []
    for prompt, completion, index in zip(prompts, completions, indices, strict=True):
        prompt_text = render_prompt(tokenizer, prompt)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"row {index}: the chat template does not render the prompt as a prefix of prompt + completion, so the "
                f"completion boundary is ambiguous (prompt renders as {prompt_text[-80:]!r}, full conversation as "
                f"{full_text[len(prompt_text) - 80 : len(prompt_text) + 40]!r})"
            )
        prompt_texts.append(prompt_text)
        completion_texts.append(full_text[len(prompt_text) :])
    return prompt_texts, completion_texts


def _tokenize_batch(
    batch: dict[str, list[Any]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    completion_fields: tuple[str, ...],
    conversational: bool,
    max_length: int,
    max_prompt_length: int | None,
) -> dict[str, list[Any]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if conversational:
        texts = {}
        for name in completion_fields:
            prompt_texts, texts[name] = _render_conversation(tokenizer, batch["prompt"], batch[name], batch["index"])
    else:
        prompt_texts, texts = batch["prompt"], {name: batch[name] for name in completion_fields}
    prompts = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    completions = {name: tokenizer(texts[name], add_special_tokens=False)["input_ids"] for name in completion_fields}

    out: dict[str, list[Any]] = {
        "prompt_ids": [],
        "_prompt_truncated": [],
        "_drop": [],
        "_prompt_len": [],
        "_completion_len": [],
    }
    for name in completion_fields:
        out[f"{name}_ids"] = []
        out[f"_{name}_truncated"] = []
    for i, prompt in enumerate(prompts):
        if bos is not None and (not prompt or prompt[0] != bos):
            prompt = [bos] + prompt
        out["_prompt_len"].append(len(prompt))
        truncated = max_prompt_length is not None and len(prompt) > max_prompt_length
        if truncated:
            keep_first = 1 if (bos is not None and prompt[0] == bos) else 0
            tail = max_prompt_length - keep_first
            prompt = prompt[:keep_first] + (prompt[len(prompt) - tail :] if tail > 0 else [])
        budget = max_length - len(prompt)
        drop = _DROP_EMPTY_PROMPT if not prompt else (_DROP_PROMPT_TOO_LONG if budget < 1 else _KEEP)
        out["prompt_ids"].append(prompt)
        out["_prompt_truncated"].append(truncated)
        out["_drop"].append(drop)
        longest = 0
        for name in completion_fields:
            ids = completions[name][i]
            if eos is not None and not conversational and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            longest = max(longest, len(ids))
            cut = len(ids) > budget
            out[f"{name}_ids"].append(ids[: max(budget, 0)] if cut else ids)
            out[f"_{name}_truncated"].append(cut and drop == _KEEP)
        out["_completion_len"].append(longest)
    return out


def tokenize_dataset(
    raw: RawData,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    split: str = "train",
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Tokenize the validated rows of one split; returns `(dataset, stats)` (see the module docstring)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    if max_prompt_length is not None and max_prompt_length >= max_length:
        log.warning(
            "%s: max_prompt_length=%d >= max_length=%d: rows whose prompt fills max_length will be filtered",
            split,
            max_prompt_length,
            max_length,
        )
    dataset = raw.dataset
    completion_fields = COMPLETION_FIELDS[raw.format]
    fingerprint = tokenize_fingerprint(
        dataset,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        conversational=raw.conversational,
    )
    keep_columns = {"index", "rm_margin", "weight", "margin"}
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "completion_fields": completion_fields,
            "conversational": raw.conversational,
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
        },
        remove_columns=[c for c in dataset.column_names if c not in keep_columns],
        new_fingerprint=fingerprint,
        num_proc=num_proc,
        desc=f"Tokenizing {split}",
    )

    def count(column: str, value: Any = True) -> int:
        return int(pc.sum(pc.equal(tokenized.data.column(column), value)).as_py() or 0) if len(tokenized) else 0

    def longest(column: str) -> int:
        return int(pc.max(tokenized.data.column(column)).as_py() or 0) if len(tokenized) else 0

    stats = TokenizeStats(
        rows_in=len(dataset),
        prompts_truncated=count("_prompt_truncated"),
        chosen_truncated=count(f"_{completion_fields[0]}_truncated"),
        rejected_truncated=count("_rejected_truncated") if raw.format == PREFERENCE else 0,
        filtered_prompt_too_long=count("_drop", _DROP_PROMPT_TOO_LONG),
        filtered_empty_prompt=count("_drop", _DROP_EMPTY_PROMPT),
        longest_prompt=longest("_prompt_len"),
        longest_completion=longest("_completion_len"),
    )
    if stats.filtered_prompt_too_long or stats.filtered_empty_prompt:
        tokenized = tokenized.filter(
            lambda drop: [d == _KEEP for d in drop],
            input_columns="_drop",
            batched=True,
            new_fingerprint=f"{fingerprint}-filter",
        )
    flags = [c for c in tokenized.column_names if c.startswith("_")]
    tokenized = tokenized.remove_columns(flags, new_fingerprint=f"{fingerprint}-final")
    if "completion_ids" in tokenized.column_names:
        tokenized = tokenized.rename_column("completion_ids", "chosen_ids", new_fingerprint=f"{fingerprint}-sft")
    order = ["index", "prompt_ids", "chosen_ids", "rejected_ids", "rm_margin", "weight", "margin"]
    tokenized = tokenized.select_columns([c for c in order if c in tokenized.column_names])
    stats.rows_out = len(tokenized)

    filtered = stats.filtered_prompt_too_long + stats.filtered_empty_prompt
    (log.warning if filtered else log.info)(
        "%s: tokenized %d -> %d rows (max_length=%d, max_prompt_length=%s): %d prompts truncated (start cut), "
        "%d %s truncated (end cut)%s, %d filtered (prompt leaves no room for a completion: %d; empty prompt: %d)",
        split,
        stats.rows_in,
        stats.rows_out,
        max_length,
        max_prompt_length,
        stats.prompts_truncated,
        stats.chosen_truncated,
        "chosen" if raw.format == PREFERENCE else "completions",
        f", {stats.rejected_truncated} rejected truncated" if raw.format == PREFERENCE else "",
        filtered,
        stats.filtered_prompt_too_long,
        stats.filtered_empty_prompt,
    )
    return tokenized, stats


def tokenize_prompts(
    raw: RawData,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int | None = None,
    split: str = "predict",
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Tokenize prompt rows for generation (`formats.validate_prompts`): columns `index`, `prompt` (as given, for
    the output) and `prompt_ids`, by the rules above (chat template with its generation prompt, one BOS, end kept
    under `max_prompt_length`); a prompt that is empty after tokenization is filtered, with a count."""
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    conversational = raw.conversational

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [render_prompt(tokenizer, p) for p in batch["prompt"]] if conversational else batch["prompt"]
        out = _tokenize_batch(
            {"prompt": texts, "index": batch["index"]},
            tokenizer=tokenizer,
            completion_fields=(),
            conversational=False,
            max_length=(max_prompt_length or 2**31) + 1,  # prompts only: no completion budget to leave
            max_prompt_length=max_prompt_length,
        )
        flags = {"_truncated": out["_prompt_truncated"], "_drop": out["_drop"], "_length": out.get("_prompt_len")}
        return {"prompt_ids": out["prompt_ids"], **{k: v for k, v in flags.items() if v is not None}}

    fingerprint = tokenize_fingerprint(
        raw.dataset, tokenizer, max_length=0, max_prompt_length=max_prompt_length, conversational=conversational
    )
    tokenized = raw.dataset.map(
        encode, batched=True, new_fingerprint=f"{fingerprint}-prompts", desc=f"Tokenizing {split}"
    )

    def count(column: str, value: Any) -> int:
        return int(pc.sum(pc.equal(tokenized.data.column(column), value)).as_py() or 0) if len(tokenized) else 0

    stats = TokenizeStats(
        rows_in=len(raw.dataset),
        prompts_truncated=count("_truncated", True),
        filtered_empty_prompt=count("_drop", _DROP_EMPTY_PROMPT),
    )
    if "_length" in tokenized.column_names and len(tokenized):
        stats.longest_prompt = int(pc.max(tokenized.data.column("_length")).as_py() or 0)
    if stats.filtered_empty_prompt:
        tokenized = tokenized.filter(lambda drop: [d == _KEEP for d in drop], input_columns="_drop", batched=True)
    tokenized = tokenized.select_columns(["index", "prompt", "prompt_ids"])
    stats.rows_out = len(tokenized)
    (log.warning if stats.filtered_empty_prompt else log.info)(
        "%s: tokenized %d -> %d prompts (max_prompt_length=%s): %d truncated (start cut), %d filtered (empty)",
        split,
        stats.rows_in,
        stats.rows_out,
        max_prompt_length,
        stats.prompts_truncated,
        stats.filtered_empty_prompt,
    )
    return tokenized, stats
