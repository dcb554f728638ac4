"""The LM head's own maths for the fast log-prob path, and a guard that checks the fast path against `forward`.

`sequence_logps`' fast path runs the decoder and applies the output embedding itself, so whatever an architecture's
`*ForCausalLM.forward` does between the two must be redone here: Granite divides the logits by `logits_scaling`,
Cohere multiplies them by `logit_scale`, Gemma soft-caps them, MiniCPM3 scales the hidden states, and so on.
`head_logits` knows the architectures of transformers that do (`HEAD_MATHS`); `fast_path_agrees` checks once per model
that the fast path gives the model's own `forward` log-probs and, where it does not, switches that model to the plain
full-logits path with a warning. An architecture missing from the table therefore costs speed, never correctness.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]
# (the model, its config) -> (what forward does to the hidden states before the head, to the logits after it)
Rule = Callable[[nn.Module, Any], tuple[Transform | None, Transform | None]]


def _softcap(cap: float | None, *, upcast: bool = False) -> Transform | None:
    if not cap:
        return None
    if upcast:  # these forwards cap the float32 logits
        return lambda x: torch.tanh(x.float() / cap) * cap
    return lambda x: torch.tanh(x / cap) * cap


def _first(n: int | None) -> Transform | None:
    return None if n is None else lambda x: x[..., :n]


_GRANITE = ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid")
_COHERE = ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")

# By `config.model_type`, each written as its `forward` writes it (same operation and operand, so same rounding).
HEAD_MATHS: dict[str, Rule] = {
    **dict.fromkeys(_GRANITE, lambda m, c: (None, lambda x: x / c.logits_scaling)),
    "hyperclovax": lambda m, c: (None, lambda x: x * c.logits_scaling),
    **dict.fromkeys(_COHERE, lambda m, c: (None, lambda x: x * m.logit_scale)),
    "falcon_h1": lambda m, c: (None, lambda x: x * m.model.lm_head_multiplier),
    "minicpm3": lambda m, c: (lambda h: h / c.logits_scaling, None),
    "inkling_text": lambda m, c: (lambda h: h / c.logits_mup_width_multiplier, _first(c.unpadded_vocab_size)),
    "recurrent_gemma": lambda m, c: (None, _softcap(c.logits_soft_cap)),
    "xlstm": lambda m, c: (None, _softcap(c.output_logit_soft_cap, upcast=True)),
    **dict.fromkeys(
        ("beam", "inkling2_text", "inkling2_loop_text"),
        lambda m, c: (None, _softcap(c.final_logit_softcapping, upcast=True)),
    ),
    # multimodal wrappers whose forward caps with the text config's value
    **dict.fromkeys(
        ("gemma3n", "gemma4", "gemma4_unified"),
        lambda m, c: (None, _softcap(c.get_text_config().final_logit_softcapping)),
    ),
}


def _default(model: nn.Module, config: Any) -> tuple[Transform | None, Transform | None]:
    # Gemma2, Gemma3/3n/4 text, VaultGemma, NanoChat: the model's own `final_logit_softcapping`
    return None, _softcap(getattr(config, "final_logit_softcapping", None))


def head_logits(model: nn.Module, head: nn.Module) -> Transform:
    """`hidden -> logits` as `model.forward` computes them from its decoder's hidden states, through `head`."""
    before, after = HEAD_MATHS.get(getattr(model.config, "model_type", None), _default)(model, model.config)

    def logits_of(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(before(hidden) if before else hidden)
        return after(logits) if after else logits

    return logits_of


# --------------------------------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------------------------------

_VERDICTS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_PROBE_ROWS, _PROBE_TOKENS = 2, 16
# Relative L1 error of the probe's token log-probs. float32 rounding differs between the two paths by ~1e-7 relative
# (the head runs on other shapes; the tests measure it), while a head scaling the fast path misses by a factor s moves
# log-probs by ~|1 - s| times the spread of the logits: >= 1e-3 relative even on untrained tiny models (Granite with
# logits_scaling=4, Cohere with logit_scale=0.3: 3e-3 to 1e-2), tens of percent on trained ones. 1e-4 sits more than
# two orders of magnitude from both.
_RTOL = 1e-4

TokenLogps = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (AttributeError, TypeError):  # torch < 2.4: per-device functions
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def probe_tolerance(model: nn.Module, device: torch.device) -> float:
    """`_RTOL`, or twice the machine epsilon of the least precise dtype the forward computes in (bfloat16/float16
    parameters, or autocast): there the two paths' head matmuls may round a logit an ulp apart. Missed head maths of
    trained models (factors of 8-16, caps of 30) still move log-probs by far more than that."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    autocast = _autocast_dtype(device.type)
    if autocast is not None:
        dtypes.add(autocast)
    return max([_RTOL] + [2 * torch.finfo(d).eps for d in dtypes])


def _probe_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """`(ids, mask, target_mask)` to probe with, smallest first: up to two unpadded rows of the batch's tokens (real
    ones: random ids could hit a multimodal model's image tokens), cut to a common length of at most 16; then the
    batch's first row as it is, for a forward that constrains lengths (xLSTM's chunked kernels)."""
    rows = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        row = ids[mask.bool()]
        if row.numel() >= 2:
            rows.append(row)
            if len(rows) == _PROBE_ROWS:
                break
    probes = []
    if rows:
        ids = torch.stack([r[: min(_PROBE_TOKENS, *(r.numel() for r in rows))] for r in rows])
        probes.append((ids, torch.ones_like(ids, dtype=attention_mask.dtype), torch.ones_like(ids[:, 1:]).bool()))
    mask = attention_mask[:1].bool()
    if (targets := mask[:, 1:] & mask[:, :-1]).any():
        probes.append((input_ids[:1], attention_mask[:1], targets))
    return probes


def fast_path_agrees(
    model: nn.Module,
    inner: nn.Module,
    fast: TokenLogps,
    full: TokenLogps,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> bool:
    """Whether `fast(ids, mask, target_mask)` (token log-probs) may stand in for `full` on `inner` (`model` unwrapped).

    Decided once per model (cached on `inner`): both run, in eval mode (no dropout) and without autograd, on a probe of
    up to 2 x 16 tokens of this batch, and must agree within `probe_tolerance`. Where they do not, this logs a warning
    and answers False for that model from then on. A batch too short to probe decides nothing (False, this call).
    """
    verdict = _VERDICTS.get(inner)
    if verdict is not None:
        return verdict
    probes = _probe_batches(input_ids, attention_mask)
    if not probes:
        return False
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for i, (ids, mask, targets) in enumerate(probes):
                try:
                    got, want = fast(ids, mask, targets), full(ids, mask, targets)
                    break
                except Exception:  # a shape this forward refuses: the next probe has the batch's own
                    if i == len(probes) - 1:
                        raise
    finally:
        for m, training in modes:
            m.training = training
    err = ((got - want).abs().sum() / want.abs().sum().clamp_min(torch.finfo(torch.float32).tiny)).item()
    tol = probe_tolerance(model, ids.device)
    verdict = err <= tol  # False for NaN too
    log.debug("%s: fast log-prob path checked against forward: %.3g (tolerance %.2g)", type(inner).__name__, err, tol)
    if not verdict:
        log.warning(
            "%s: the fast log-prob path (decoder, then the output embedding at completion positions) differs from the "
            "model's own forward by %.3g (relative L1 over %d probe tokens; tolerance %.2g): its forward probably "
            "scales or caps the logits in a way madpo.logits.HEAD_MATHS does not know. Using the full-logits path for "
            "this model (right values, more time and memory).",
            type(inner).__name__,
            err,
            targets.sum().item(),
            tol,
        )
    _VERDICTS[inner] = verdict
    return verdict
