"""Batched no-grad scoring of a tokenized dataset: reward-model margins and reference log-probs, DDP-sharded and
cached on disk.

- `score_margins`: rm_margin = r(prompt + chosen) - r(prompt + rejected), raw float32 (no normalisation, no clipping),
  with the reward model in `eval()` under `torch.no_grad()` (docs/method.md eq. (3)).
- `score_reference_logps`: summed completion log-probs of chosen and rejected under a frozen reference model.

Both run the 2B `[chosen; rejected]` batch of `PreferenceCollator` through the shared helpers of `madpo.modeling`
(`pair_rewards`, `sequence_logps`), so scoring and training read rewards and log-probs identically. Inside each rank
rows are scored longest first (less padding, and an out-of-memory error shows up on the first batch), then put back
in dataset order. Under `torch.distributed` each rank scores a contiguous shard and the shards are all-gathered, so
every rank returns the full `(N,)` result in dataset order.

`cached_columns` stores such results as safetensors files keyed by a hash of everything that determines them
(data content, model weights, tokenizer, lengths, kind), written atomically (temp file + `os.replace`).

`attach_rm_margins` / `attach_reference_logps` add the cached results to a tokenized dataset as columns (what
`PreferenceDataModule.setup` and the pipeline call). `rm_margin` is the reward model's margin from the scorer to the
loss (logged as `rm/margin_mean`); TRL's metric `rewards/margins` is the policy's implicit reward margin beta * h.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from madpo.distributed import all_gather_object, barrier, get_rank, rank_and_world
from madpo.io import atomic_path
from madpo.modeling import (
    check_reward_model_path,
    load_reward_model,
    load_tokenizer,
    pair_rewards,
    reward_pooling,
    sequence_logps,
    state_fingerprint,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)

ForwardContext = Callable[[], AbstractContextManager]
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


# ------------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _score(
    model: nn.Module,
    dataset: datasets.Dataset,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    *,
    width: int,
    batch_size: int,
    device: torch.device | str | None,
    forward_context: ForwardContext | None,
    sort_by_length: bool,
    progress: bool,
    desc: str,
    resume_dir: str | os.PathLike | None = None,
    chunk_pairs: int = 2048,
) -> torch.Tensor:
    """(N, width) float32 results of `fn(model, batch)` over the dataset, in dataset order, on every rank."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    missing = [c for c in TOKEN_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{desc}: needs preference rows with columns {list(TOKEN_COLUMNS)}; missing {missing}")
    device = torch.device(device) if device is not None else _device_of(model)
    forward_context = forward_context or nullcontext
    rank, world = rank_and_world()
    n = len(dataset)
    lo, hi = rank * n // world, (rank + 1) * n // world
    columns = dataset.select_columns(["index", *TOKEN_COLUMNS]).with_format(None)[lo:hi] if hi > lo else None
    local = torch.empty(hi - lo, width, dtype=torch.float32)
    if columns is not None:
        lengths = np.array(
            [
                len(p) + max(len(c), len(r))
                for p, c, r in zip(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"], strict=True)
            ]
        )
        names = list(columns)
        was_training = model.training
        model.eval()
        bar = tqdm(total=hi - lo, desc=desc, unit="pair", disable=not progress or rank != 0 or not sys.stderr.isatty())
        try:
            # The shard is scored in chunks; with `resume_dir` each finished chunk is saved (atomically), so an
            # interrupted pass redoes only the chunk it was in.
            for c_start in range(0, hi - lo, chunk_pairs):
                c_end = min(c_start + chunk_pairs, hi - lo)
                name = f"rank{rank}of{world}-{lo + c_start}-{lo + c_end}.safetensors"
                part = Path(resume_dir) / name if resume_dir else None
                done = _try_load(part, None) if part is not None else None
                if done is not None and done["values"].shape == (c_end - c_start, width):
                    local[c_start:c_end] = done["values"]
                    bar.update(c_end - c_start)
                    continue
                chunk_order = c_start + (
                    np.argsort(-lengths[c_start:c_end], kind="stable") if sort_by_length else np.arange(c_end - c_start)
                )
                with torch.no_grad():
                    for start in range(0, len(chunk_order), batch_size):
                        rows = chunk_order[start : start + batch_size]
                        batch = collator([{k: columns[k][j] for k in names} for j in rows])
                        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                        with forward_context():
                            out = fn(model, batch)
                        local[torch.from_numpy(rows)] = out.detach().float().reshape(len(rows), width).cpu()
                        bar.update(len(rows))
                if part is not None:
                    atomic_save({"values": local[c_start:c_end].contiguous()}, part)
        finally:
            bar.close()
            model.train(was_training)
    if world == 1:
        return local
    return torch.cat(all_gather_object(local), 0)  # contiguous shards in rank order = dataset order


def _margin_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    rewards = pair_rewards(model, batch["input_ids"], batch["attention_mask"])
    b = rewards.shape[0] // 2
    return rewards[:b] - rewards[b:]


def _logps_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    b = logps.shape[0] // 2
    return torch.stack([logps[:b], logps[b:]], 1)


def score_margins(
    reward_model: nn.Module,
    dataset: datasets.Dataset,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    forward_context: ForwardContext | None = None,
    sort_by_length: bool = True,
    progress: bool = True,
    resume_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """rm_margin = r(prompt + chosen) - r(prompt + rejected) of every pair: raw float32 `(N,)` in dataset order.

    The model is put in `eval()` for the pass (its train/eval mode is restored after) and must already be on
    `device` (default: the device of its parameters). `forward_context` (e.g. Lightning's
    `precision_plugin.forward_context`) wraps each forward. With `resume_dir`, finished chunks of the pass are saved
    there and reused, so an interrupted pass does not recompute them.
    """
    return _score(
        reward_model,
        dataset,
        collator,
        _margin_fn,
        width=1,
        batch_size=batch_size,
        device=device,
        forward_context=forward_context,
        sort_by_length=sort_by_length,
        progress=progress,
        resume_dir=resume_dir,
        desc="Scoring rm_margin",
    )[:, 0]


def score_reference_logps(
    model: nn.Module,
    dataset: datasets.Dataset,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    forward_context: ForwardContext | None = None,
    sort_by_length: bool = True,
    progress: bool = True,
    resume_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs `(chosen (N,), rejected (N,))` float32 under `model` (eval, no grad)."""
    out = _score(
        model,
        dataset,
        collator,
        _logps_fn,
        width=2,
        batch_size=batch_size,
        device=device,
        forward_context=forward_context,
        sort_by_length=sort_by_length,
        progress=progress,
        resume_dir=resume_dir,
        desc="Scoring reference log-probs",
    )
    return out[:, 0].contiguous(), out[:, 1].contiguous()


# ------------------------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------------------------


def data_fingerprint(dataset: datasets.Dataset, columns: tuple[str, ...] = TOKEN_COLUMNS) -> str:
    """Hash of the token content of a tokenized dataset (row count, lengths and ids of `columns`, in order).

    Content-based rather than `dataset._fingerprint`, so equal data gives an equal key whatever its history (files,
    in-memory, split), and any change of a token changes it.
    """
    names = [c for c in columns if c in dataset.column_names]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([len(dataset), names]).encode())
    if len(dataset) and names:
        for table in dataset.select_columns(names).with_format("arrow").iter(batch_size=8192):
            for name in names:
                column = table.column(name)
                if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                    parts = [pc.list_value_length(column), pc.list_flatten(column)]
                else:
                    parts = [column]
                for part in parts:
                    digest.update(np.asarray(part.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
    return digest.hexdigest()


def cache_key(kind: str, key_parts: dict[str, Any]) -> str:
    """blake2b of the JSON of `kind` and `key_parts` (sorted keys): any changed part gives another key."""
    payload = json.dumps({"kind": kind, "parts": key_parts}, sort_keys=True, default=str)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def cache_path(cache_dir: str | os.PathLike, kind: str, key_parts: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{kind}-{cache_key(kind, key_parts)}.safetensors"


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """`save_file` to a temporary name in the same folder, then `os.replace`: a file at `path` is always complete."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _try_load(path: Path, num_rows: int | None) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - an unreadable cache is a miss, said aloud
        log.warning("cache file %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None
    if num_rows is not None and any(t.shape != (num_rows,) for t in tensors.values()):
        log.warning("cache file %s does not hold (%d,) columns; recomputing", path, num_rows)
        return None
    return tensors


def cached_columns(
    cache_dir: str | os.PathLike,
    kind: str,
    key_parts: dict[str, Any],
    compute: Callable[..., dict[str, torch.Tensor]],
    *,
    num_rows: int | None = None,
    resumable: bool = False,
) -> tuple[dict[str, torch.Tensor], bool]:
    """`(columns, hit)`: the cached columns for `(kind, key_parts)`, or `compute()`'s result, then cached.

    Under DDP every rank must call this (compute is collective); it is a hit only if every rank can read the file,
    only rank 0 writes, and all ranks meet at a barrier after the write. With `resumable`, `compute(resume_dir=...)`
    gets a folder beside the cache file (same key) for finished chunks of an interrupted pass; it is removed once the
    complete file is written.
    """
    path = cache_path(cache_dir, kind, key_parts)
    loaded = _try_load(path, num_rows)
    hit = all(all_gather_object(loaded is not None))
    if hit:
        assert loaded is not None
        log.info("%s: cache hit %s", kind, path)
        return loaded, True
    log.info("%s: cache miss, computing %s", kind, path)
    parts = path.with_suffix(".parts")
    tensors = compute(resume_dir=parts) if resumable else compute()
    if get_rank() == 0:
        atomic_save(tensors, path, metadata={"kind": kind, "key_parts": json.dumps(key_parts, default=str)})
    barrier()
    if resumable and get_rank() == 0:
        shutil.rmtree(parts, ignore_errors=True)
    return tensors, False


# ------------------------------------------------------------------------------------------------------------------
# Scored columns on a dataset (what PreferenceDataModule.setup and the pipeline call)
# ------------------------------------------------------------------------------------------------------------------


def scoring_context(trainer: Any | None) -> tuple[torch.device, ForwardContext | None, str]:
    """`(device, forward_context, precision)` to score under: the trainer's root device and precision plugin when a
    trainer is given, else CPU float32 (`"32-true"`). The precision is part of the cache key."""
    if trainer is None:
        return torch.device("cpu"), None, "32-true"
    plugin = trainer.precision_plugin
    return trainer.strategy.root_device, plugin.forward_context, str(getattr(plugin, "precision", None))


@contextmanager
def open_reward_model(
    path: str, tokenizer: PreTrainedTokenizerBase | None, *, device: Any = "cpu", trust_remote_code: bool = False
) -> Iterator[nn.Module]:
    """The reward model exported at `path`, frozen, in eval mode, on `device`; freed (and the CUDA cache emptied) on
    exit. Refuses a path that is no reward-model directory, and a reward model whose tokenizer differs from the data
    tokenizer `tokenizer` (its margins would be read off token ids it was not trained on). `tokenizer=None`: the
    caller scores text tokenized with the reward model's own tokenizer (`madpo.data.rm_text`), so nothing to check."""
    check_reward_model_path(path)
    rm_tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if tokenizer is not None and tokenizer_fingerprint(rm_tokenizer) != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"the reward model's tokenizer ({path}) differs from the data tokenizer ({tokenizer.name_or_path}): "
            "margins would be scored on token ids it was not trained on; train the reward model with the "
            "policy's tokenizer"
        )
    model = load_reward_model(path, trust_remote_code=trust_remote_code).to(device).eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def set_column(dataset: datasets.Dataset, name: str, values: torch.Tensor) -> datasets.Dataset:
    """`dataset` with column `name` = `values` as float64, replacing a column of that name."""
    if name in dataset.column_names:
        dataset = dataset.remove_columns(name)
    return dataset.add_column(name, values.double().tolist())


def _attach(
    dataset: datasets.Dataset,
    model: nn.Module,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    kind: str,
    names: tuple[str, ...],
    scorer: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    *,
    cache_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    precision: str,
    model_fingerprint: str | None,
    batch_size: int,
    device: torch.device | str | None,
    forward_context: ForwardContext | None,
    stats: dict[str, Any] | None,
) -> datasets.Dataset:
    """`dataset` + the columns `names` of `scorer(model, dataset, collator, ...)`, cached under a key of everything
    that determines them. Caches written before stay valid only while the key's contents stay as they are."""
    key_parts = {
        "data": data_fingerprint(dataset),
        "model": model_fingerprint or state_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "precision": precision,
    }

    def compute(resume_dir: Any = None) -> dict[str, torch.Tensor]:
        kw = {"batch_size": batch_size, "device": device, "forward_context": forward_context}
        out = scorer(model, dataset, collator, resume_dir=resume_dir, **kw)
        return dict(zip(names, out if isinstance(out, tuple) else (out,), strict=True))

    columns, hit = cached_columns(cache_dir, kind, key_parts, compute, num_rows=len(dataset), resumable=True)
    for name in names:
        dataset = set_column(dataset, name, columns[name])
    if stats is not None:
        stats["cache"] = "hit" if hit else "miss"
        if kind == "rm_margin":
            stats["mean"] = float(columns["rm_margin"].mean()) if len(dataset) else float("nan")
    return dataset


def attach_rm_margins(
    dataset: datasets.Dataset,
    reward_model: nn.Module,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    cache_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    precision: str = "32-true",
    model_fingerprint: str | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    forward_context: ForwardContext | None = None,
    stats: dict[str, Any] | None = None,
) -> datasets.Dataset:
    """`dataset` (tokenized preference rows) with an `rm_margin` column: r(chosen) - r(rejected) of `reward_model`
    (`score_margins`; float64 values of the float32 scores), replacing any `rm_margin` the rows had.

    Cached under `cache_dir` by the data's token content, the model's weights (`model_fingerprint`, default
    `state_fingerprint(reward_model)`: pass it when scoring several splits with one model), the tokenizer's
    fingerprint, the lengths the data was tokenized with and `precision` (see `scoring_context`); resumable chunk by
    chunk; DDP-sharded (every rank calls it and gets every row). `stats`, when given, gets `cache` and `mean`.
    The weights do not say how the reward is pooled (`madpo.modeling.reward_pooling`): a pooling other than "last"
    is appended to the model part of the key, so caches of last-token reward models keep their keys.
    """
    fingerprint = model_fingerprint or state_fingerprint(reward_model)
    if (pooling := reward_pooling(reward_model)) != "last":
        fingerprint += f":pooling={pooling}"
    return _attach(
        dataset,
        reward_model,
        collator,
        "rm_margin",
        ("rm_margin",),
        score_margins,
        cache_dir=cache_dir,
        tokenizer=tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        precision=precision,
        model_fingerprint=fingerprint,
        batch_size=batch_size,
        device=device,
        forward_context=forward_context,
        stats=stats,
    )


def attach_reference_logps(
    dataset: datasets.Dataset,
    reference_model: nn.Module,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    cache_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    precision: str = "32-true",
    model_fingerprint: str | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    forward_context: ForwardContext | None = None,
    stats: dict[str, Any] | None = None,
) -> datasets.Dataset:
    """`dataset` with `ref_chosen_logps`/`ref_rejected_logps` columns: summed completion log-probs under
    `reference_model` (`score_reference_logps`), cached, resumable and DDP-sharded as `attach_rm_margins`. Pass the
    module's `reference_fingerprint(model)` as `model_fingerprint` when it has one (it may leave out tensors that do
    not change the reference's outputs). `stats`, when given, gets `cache`."""
    return _attach(
        dataset,
        reference_model,
        collator,
        "ref_logps",
        ("ref_chosen_logps", "ref_rejected_logps"),
        score_reference_logps,
        cache_dir=cache_dir,
        tokenizer=tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        precision=precision,
        model_fingerprint=model_fingerprint,
        batch_size=batch_size,
        device=device,
        forward_context=forward_context,
        stats=stats,
    )
