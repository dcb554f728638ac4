"""Prompts from reviews and sampled continuations from a causal LM (docs/method.md §IMDB protocol).

Prompts are encoded as madpo encodes them everywhere: BOS (if the tokenizer has one) followed by the prompt's tokens
without other special tokens; batches are LEFT-padded so every row's continuation starts at the same position.
Sampling is seeded (`torch.manual_seed` inside `torch.random.fork_rng`, so the caller's RNG state is untouched): the
same model, prompts, batch size and seed give the same samples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def encode_prompt(tokenizer, text: str) -> list[int]:
    """BOS (if the tokenizer has one and the text does not already start with it) + the prompt's tokens, without
    other special tokens: the same ids as `madpo.data.tokenize` gives a prompt, whether or not the tokenizer adds
    BOS itself."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


def prompt_prefix(text: str, tokenizer, n_tokens: int) -> str:
    """The text of a review's first `n_tokens` tokens (no special tokens; the paper uses 20), decoded back."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def split_review(text: str, tokenizer, n_prompt_tokens: int, max_completion_tokens: int) -> tuple[str, str]:
    """(prompt, continuation) of a review: its first `n_prompt_tokens` tokens, then at most `max_completion_tokens`
    more: the original review as a completion of the same length budget as the samples (the tiers' `original`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def dec(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return dec(ids[:n_prompt_tokens]), dec(ids[n_prompt_tokens : n_prompt_tokens + max_completion_tokens])


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the model's generation_config EOS (int or list)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, list | tuple) else {config_eos}
    return {int(i) for i in ids if i is not None}


def sample_continuation_ids(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    temperature: float | None = 1.0,
    top_k: int | None = 0,
    top_p: float | None = 1.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "sampling",
) -> tuple[list[list[list[int]]], dict]:
    """Token ids of `num_samples` sampled continuations per prompt (`[prompt][sample] -> ids`; padding removed, the
    EOS kept where the model emitted one), and stats (`n_tokens`, `seconds`, `tokens_per_s`, `n_eos`)."""
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"num_samples, batch_size and max_new_tokens must be ≥ 1; got {num_samples}, {batch_size}, {max_new_tokens}"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("sampling needs a tokenizer with a pad or EOS token")
    eos_ids = _eos_ids(model, tokenizer)
    encoded = []
    for i, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, p)
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization (and the tokenizer has no BOS): {p!r}")
        encoded.append(ids)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit:
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i]), default=None)
        if longest is not None and len(encoded[longest]) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {longest} has {len(encoded[longest])} tokens; with max_new_tokens={max_new_tokens} that "
                f"exceeds the model's max_position_embeddings={limit}: shorten the prompts or max_new_tokens"
            )
    # None: keep the model's generation_config value (the paper sampled with the model's default config)
    knobs = {k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)) if v is not None}
    was_training = model.training
    model.eval()
    out: list[list[list[int]]] = []
    n_tokens = n_eos = 0
    start = time.perf_counter()
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            bar = tqdm(total=len(encoded), desc=desc, unit="prompt", disable=not progress)
            for b in range(0, len(encoded), batch_size):
                ids, mask = _left_pad(encoded[b : b + batch_size], pad_id)
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_samples,
                    pad_token_id=pad_id,
                    **knobs,
                )[:, ids.shape[1] :].cpu()
                for row in range(ids.shape[0]):
                    samples = []
                    for s in range(num_samples):
                        seq = generated[row * num_samples + s].tolist()
                        # generation stops at the first EOS and pads after it; without one, all tokens are sampled
                        stop = next((t for t, tok in enumerate(seq) if tok in eos_ids), None)
                        if stop is not None:
                            seq = seq[: stop + 1]
                            n_eos += 1
                        samples.append(seq)
                        n_tokens += len(seq)
                    out.append(samples)
                bar.update(ids.shape[0])
            bar.close()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    stats = {
        "n_sequences": len(encoded) * num_samples,
        "n_tokens": n_tokens,
        "n_eos": n_eos,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None,
    }
    return out, stats


def decode_continuation(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def sample_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    temperature: float | None = 1.0,
    top_k: int | None = 0,
    top_p: float | None = 1.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[list[str]]:
    """`num_samples` sampled continuations per prompt (`[prompt][sample]`), decoded without the prompt and without
    special tokens. Defaults sample from the model's full distribution (temperature 1, no top-k / top-p); pass None
    for any of the three to keep the model's `generation_config` value instead (the paper's "default generation
    config", e.g. Gemma 3's top-k 64 / top-p 0.95)."""
    ids, _ = sample_continuation_ids(
        model,
        tokenizer,
        prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        device=device,
        progress=progress,
    )
    return [[decode_continuation(tokenizer, s) for s in samples] for samples in ids]


__all__ = [
    "decode_continuation",
    "encode_prompt",
    "prompt_prefix",
    "sample_continuation_ids",
    "sample_continuations",
    "split_review",
]
