"""Models and tokenizers: loading (hub id or local directory), building small ones offline, and the two forward
helpers every layer shares: summed completion log-probs (policy, reference) and pooled rewards (reward model).

Everything loads through transformers' `from_pretrained`, so a hub id and a local directory take the same path.
`trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from madpo.errors import UserError
from madpo.logits import fast_path_agrees, head_logits

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}


def resolve_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(k for k in _DTYPES if k)} or null, got {dtype!r}")
    return _DTYPES[dtype]


def check_model_path(name_or_path: str | os.PathLike) -> None:
    """Refuse a path that looks local but does not exist, before transformers calls it an invalid hub repo id."""
    name = os.fspath(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # a hub id is `name` or `org/name`
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise UserError(f"model path {name!r} does not exist (expected a local model directory or a hub id)")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local directory, with a pad token (EOS if it has none, as TRL does)."""
    check_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _architectures(name_or_path: str, trust_remote_code: bool) -> list[str]:
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return list(getattr(config, "architectures", None) or [])


def is_reward_model_dir(name_or_path: str, *, trust_remote_code: bool = False) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in _architectures(name_or_path, trust_remote_code))


def load_causal_lm(
    name_or_path: str, *, dtype: str | None = None, trust_remote_code: bool = False, pad_token_id: int | None = None
) -> PreTrainedModel:
    """An `AutoModelForCausalLM` from a hub id or directory (refuses a reward-model checkpoint)."""
    if os.path.isdir(name_or_path) and is_reward_model_dir(name_or_path, trust_remote_code=trust_remote_code):
        raise ValueError(
            f"{name_or_path} holds a sequence-classification (reward) model; a causal LM was expected here"
        )
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


REWARD_POOLINGS = ("last", "mean")
POOLING_ATTRIBUTE = "madpo_reward_pooling"
"""The model-config attribute that records how `pair_rewards` pools a reward model's hidden states. It is saved in
the exported `config.json` (transformers keeps extra config attributes), so whoever opens the directory reads the
reward the way it was trained; a config without it (an older export, a plain checkpoint) means "last"."""


def check_pooling(pooling: str) -> str:
    if pooling not in REWARD_POOLINGS:
        raise ValueError(f"pooling must be one of {list(REWARD_POOLINGS)}, got {pooling!r}")
    return pooling


def init_reward_model(
    name_or_path: str,
    *,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
    pooling: str = "last",
) -> PreTrainedModel:
    """A fresh reward model: the backbone of `name_or_path` (a causal LM, or an encoder such as BERT that has no LM
    head) plus a new `Linear(hidden, 1)` head, with `pooling` recorded in its config (`POOLING_ATTRIBUTE`)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path,
        num_labels=1,
        dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code,
        pad_token_id=pad_token_id,
    )
    setattr(model.config, POOLING_ATTRIBUTE, check_pooling(pooling))
    return model


def check_reward_model_path(name_or_path: str) -> None:
    """Refuse, with guidance, a path that cannot be a reward-model directory (a Lightning .ckpt, a missing dir)."""
    if os.path.isfile(name_or_path):
        raise ValueError(
            f"reward_model={name_or_path!r} is a file (a Lightning checkpoint?); pass the transformers directory the "
            "reward run exports at the end of fit (printed as '[madpo] RewardLightningModule exported to <dir>', "
            "by default <log_dir>/hf_model)"
        )
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    if looks_local and not os.path.isdir(name_or_path):
        raise ValueError(f"reward_model={name_or_path!r} does not exist")


def load_reward_model(
    name_or_path: str, *, dtype: str | None = None, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A trained reward model (as exported by `RewardLightningModule`): refuses anything that is not one."""
    check_reward_model_path(name_or_path)
    architectures = _architectures(name_or_path, trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        kind = "a causal LM (policy)" if any(a.endswith("ForCausalLM") for a in architectures) else "not a reward model"
        raise ValueError(
            f"reward_model={name_or_path!r} is {kind}: its config lists architectures {architectures}; expected a "
            "*ForSequenceClassification checkpoint with num_labels=1, as RewardLightningModule exports"
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    if model.config.num_labels != 1:
        raise ValueError(f"reward_model={name_or_path!r} has num_labels={model.config.num_labels}; expected 1")
    return model


# --------------------------------------------------------------------------------------------------------------------
# Forward helpers
# --------------------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected, so they still act)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _SelectiveLogSoftmax(torch.autograd.Function):
    """`log_softmax(logits)[row, target[row]]` in float32, memory-light.

    Forward keeps only `exp(logits - max)` and the row sums for backward (no `log_softmax` output, no dense one-hot
    gradient); backward turns that buffer in place into `g * (onehot - softmax)`. Same values as
    `-F.cross_entropy(logits.float(), targets, reduction="none")` (tests check 1e-5), about half the time and a third
    of the memory of that pair of kernels. The saved buffer is consumed by backward, so a second backward through the
    same graph raises (autograd's in-place check) instead of returning a wrong gradient.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, consume: bool = False) -> torch.Tensor:
        x = logits.float()
        row_max = x.amax(-1, keepdim=True)
        target_logits = x.gather(1, targets[:, None])
        # `consume`: the caller reads the logits no more (the head's backward needs its input, not its output), so the
        # buffer is reused in place and one positions x vocabulary tensor fewer is alive at the peak
        exp = x.sub_(row_max).exp_() if consume or x is not logits else torch.exp(x - row_max)
        row_sum = exp.sum(-1, keepdim=True)
        out = (target_logits - row_max - row_sum.log()).squeeze(1)
        ctx.save_for_backward(exp, row_sum, targets)
        ctx.logits_dtype = logits.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        exp, row_sum, targets = ctx.saved_tensors
        g = grad.float()[:, None]
        exp.mul_(-g / row_sum)  # -g * softmax
        exp.scatter_add_(1, targets[:, None], g)  # + g * onehot
        return exp.to(ctx.logits_dtype), None, None


_NO_GRAD_CHUNK_ELEMENTS = 1 << 23  # logits per chunk without autograd: 32 MiB in float32
GRAD_CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk with autograd and a frozen head (64 MiB in float32). Up to it the head runs on all positions at
once; above it (large batches x large vocabularies, e.g. LoRA with the head frozen) in chunks whose gradient rows are
taken in the forward pass (`_FrozenHeadTokenLogps`), so no positions x vocabulary tensor is ever held. 0: never."""


class _FrozenHeadTokenLogps(torch.autograd.Function):
    """Token log-probs through a frozen head, in chunks, with d log p_t / d hidden_t taken in the forward pass.

    Each position's log-prob depends on its own hidden row only, so one backward per chunk of `sum(log p)` gives every
    row's gradient at once; backward then just scales those (N, d) rows by the upstream gradient. No logits are kept
    and none are recomputed: the cost is that of the plain path (one head forward, one head backward), the memory one
    chunk of logits plus the (N, d) gradient rows. The head maths (`logits_of`) are whatever the architecture does.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, logits_of: Any, step: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_rows = torch.empty_like(hidden)
        for i in range(0, hidden.shape[0], step):
            with torch.enable_grad():
                chunk = hidden[i : i + step].detach().requires_grad_(True)
                logps = _SelectiveLogSoftmax.apply(logits_of(chunk), targets[i : i + step], True)
                (grad_rows[i : i + step],) = torch.autograd.grad(logps.sum(), chunk)
            out[i : i + step] = logps.detach()
        ctx.save_for_backward(grad_rows)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad.to(grad_rows.dtype)[:, None], None, None, None


def _token_logps(
    inner: nn.Module, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_elements: int | None = None
) -> torch.Tensor:
    """log p(target) at each selected position, from the decoder's hidden states there (N, d) -> (N,) float32.

    With autograd: the LM head on all N positions, then `_SelectiveLogSoftmax`, or, with a frozen head and more than
    `GRAD_CHUNK_ELEMENTS` logits, `_FrozenHeadTokenLogps` in chunks. Without (reference scoring): the same maths in
    chunks of positions, so scoring holds at most ~32 MiB of logits however large the batch or vocabulary.
    The architecture's own head maths (logit scaling, soft-capping: `madpo.logits.head_logits`) apply in both.
    """
    logits_of = head_logits(inner, head)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    vocab = getattr(head, "out_features", None) or inner.config.get_text_config().vocab_size
    if needs_grad:
        chunk = GRAD_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        if not chunk or hidden.shape[0] * vocab <= chunk:
            return _SelectiveLogSoftmax.apply(logits_of(hidden), targets, True)
        if not any(p.requires_grad for p in head.parameters()):  # e.g. LoRA on the attention, head frozen
            return _FrozenHeadTokenLogps.apply(hidden, targets, logits_of, max(1, chunk // vocab))
        # a trained head would need its logits recomputed in backward: slower than holding them (bench/memory.py)
        return _SelectiveLogSoftmax.apply(logits_of(hidden), targets, True)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    step = max(1, _NO_GRAD_CHUNK_ELEMENTS // vocab)
    for start in range(0, hidden.shape[0], step):
        x = logits_of(hidden[start : start + step]).float()
        row_max = x.amax(-1, keepdim=True)
        lse = (x - row_max).exp_().sum(-1, keepdim=True).log_() + row_max
        out[start : start + step] = (x.gather(1, targets[start : start + step, None]) - lse).squeeze(1)
    return out


def _fast_token_logps(
    inner: nn.Module,
    decoder: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return _token_logps(inner, head, hidden[:, :-1][target_mask], input_ids[:, 1:][target_mask], chunk_elements)


def _full_token_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][target_mask]
    return -F.cross_entropy(logits.float(), input_ids[:, 1:][target_mask], reduction="none")


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    fast: bool = True,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the completion tokens of each row, and their count.

    log π(y|x) = Σ_{t ∈ completion} log p(input_ids[t] | input_ids[:t]).

    The fast path runs the decoder once and applies the LM head only at positions that predict a completion token,
    so prompt and padding logits are never materialised, and reads the token log-probs with a memory-light selective
    log-softmax (`_SelectiveLogSoftmax`; chunked when no gradient is needed); `fast=False` is the plain full-logits
    `cross_entropy` computation it is tested against. `chunk_elements` overrides `GRAD_CHUNK_ELEMENTS` (0: never
    chunk). Before its first use on a model, the fast path is checked
    against that model's own forward on a few tokens (`madpo.logits.fast_path_agrees`); a model whose head maths it
    does not reproduce gets the full-logits path, with a warning. Returns `(logps (R,) float32, n_tokens (R,) long)`.
    """
    target_mask = completion_mask[:, 1:].bool()  # position t-1 predicts token t
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    inner = _unwrap(model)
    decoder = inner.get_decoder() if fast and hasattr(inner, "get_decoder") else None
    head = inner.get_output_embeddings()
    token_logps_of = partial(_full_token_logps, model)
    if decoder is not None and decoder is not inner and head is not None:
        fast_of = partial(_fast_token_logps, inner, decoder, head, chunk_elements=chunk_elements)
        if fast_path_agrees(model, inner, fast_of, token_logps_of, input_ids, attention_mask):
            token_logps_of = fast_of
    token_logps = token_logps_of(input_ids, attention_mask, target_mask)
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    logps = logps.index_add(0, rows, token_logps)
    return logps, target_mask.sum(1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(1)


def _score_head(model: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise ValueError(f"{type(model).__name__} has no 'score' or 'classifier' head; cannot read rewards")


def reward_pooling(model: nn.Module) -> str:
    """How `pair_rewards` pools this reward model's hidden states: its config's `POOLING_ATTRIBUTE`, else "last"."""
    return check_pooling(getattr(_unwrap(model).config, POOLING_ATTRIBUTE, None) or "last")


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(R, T, d) final hidden states -> (R, d): the last non-pad token's ("last"), or the mean over the non-pad
    tokens ("mean", summed in float32), for left or right padding alike."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    if pooling == "mean":
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return pooled.to(hidden.dtype)
    raise ValueError(f"pooling must be one of {list(REWARD_POOLINGS)}, got {pooling!r}")


def pair_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward r(x, y) of each row (float32, shape (R,)): the head on the backbone's final hidden states,
    pooled as the model's config records (`reward_pooling`). Training and scoring both call this, so a reward is
    read one way; the architecture's own classification forward (a BERT pooler, dropout) is not used."""
    inner = _unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    pooled = pool_hidden(hidden, attention_mask, reward_pooling(inner))
    return _score_head(inner)(pooled).squeeze(-1).float()


# --------------------------------------------------------------------------------------------------------------------
# Fingerprints (cache keys) and small offline models
# --------------------------------------------------------------------------------------------------------------------


def is_adapter_tensor(name: str) -> bool:
    """Whether a state-dict entry belongs to a peft LoRA adapter (not to the base model)."""
    return ".lora_" in name or "lora_magnitude_vector" in name


def state_fingerprint(model: nn.Module, *, skip: Callable[[str], bool] | None = None) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, values) except those `skip` names: a cache key
    for a model's outputs."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if skip is not None and skip(name):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary and special tokens: two tokenizers with equal fingerprints tokenize alike."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "class": type(tokenizer).__name__,
    }
    return hashlib.blake2b(json.dumps(payload).encode(), digest_size=16).hexdigest()


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 8192
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer offline (seconds) and save it as a transformers tokenizer directory."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_causal_lm(
    tokenizer: PreTrainedTokenizerBase, *, model_type: str = "llama", seed: int = 0, **config: Any
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given shape (e.g. hidden_size=256, num_hidden_layers=4)."""
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)
