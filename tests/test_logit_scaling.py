"""`sequence_logps`' fast path (decoder, then the output embedding at completion positions) against each model's own
forward, for every causal-LM architecture of transformers whose forward scales or caps the logits, or scales the hidden
states before the head; and the guard that catches head maths the fast path does not know.

Models are tiny and random (1-2 layers, vocab 128). Their head weights are enlarged so that the logits spread over
several units: on near-uniform logits a missed scaling or cap would change log-probs too little to see.
"""

import copy
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from madpo import modeling
from madpo.modeling import sequence_logps

VOCAB, UNPADDED = 128, 120  # token ids stay below UNPADDED (Inkling's forward drops the logits above it)
BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MOE = {"num_local_experts": 2, "num_experts_per_tok": 1}
_INKLING = {
    "unpadded_vocab_size": UNPADDED,
    "n_routed_experts": 2,
    "num_experts_per_tok": 1,
    "moe_intermediate_size": 32,
    "swa_num_attention_heads": 2,
    "swa_num_key_value_heads": 1,
    "swa_head_dim": 16,
}
_PER_LAYER = {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8}
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
CAP = {"final_logit_softcapping": 5.0}

# model_type -> config overrides: each with a non-trivial factor for the head maths its forward does
ARCHITECTURES = {
    "llama": {},  # none: the plain case
    "granite": {"logits_scaling": 4.0},  # logits / logits_scaling
    "granite_swa": {"logits_scaling": 4.0},
    "granitemoe": {"logits_scaling": 4.0, **_MOE},
    "granitemoe_swa": {"logits_scaling": 4.0, **_MOE},
    "granitemoeshared": {"logits_scaling": 4.0, "shared_intermediate_size": 32, **_MOE},
    "granitemoehybrid": {
        "logits_scaling": 4.0,
        "shared_intermediate_size": 32,
        "layer_types": ["mamba", "attention"],
        "num_hidden_layers": 2,
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
        **_MOE,
    },
    "hyperclovax": {"logits_scaling": 0.3},  # logits * logits_scaling
    "cohere": {"logit_scale": 0.3},  # logits * logit_scale
    "cohere2": {"logit_scale": 0.3},
    "cohere2_moe": {"logit_scale": 0.3},
    "cohere_compass_text": {
        "logit_scale": 0.3,
        "layer_types": ["full_attention"],
        "rope_parameters": {"full_attention": _ROPE, "sliding_attention": _ROPE},
    },
    "falcon_h1": {"lm_head_multiplier": 0.3},  # logits * lm_head_multiplier
    # hidden / logits_scaling (= hidden_size / dim_model_base = 4) before the head
    "minicpm3": {"dim_model_base": 8, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                 "qk_rope_head_dim": 8, "v_head_dim": 16, "num_key_value_heads": 2},  # fmt: skip
    # hidden / logits_mup_width_multiplier before the head, logits cut to unpadded_vocab_size
    "inkling_text": {"logits_mup_width_multiplier": 4.0, "n_shared_experts": 1, **_INKLING},
    # tanh(logits / cap) * cap
    "gemma2": CAP,
    "gemma3_text": CAP,
    "gemma3n_text": {
        **CAP,
        **_PER_LAYER,
        "num_kv_shared_layers": 0,
        "layer_types": ["full_attention"],
        "intermediate_size": [64],
        "activation_sparsity_pattern": [0.0],
        "laurel_rank": 4,
        "altup_num_inputs": 2,
    },
    "gemma4_text": {**CAP, **_PER_LAYER},
    "gemma4_unified_text": CAP,
    "vaultgemma": CAP,
    "nanochat": CAP,
    "beam": CAP,  # the cap in float32
    "inkling2_text": {**CAP, **_INKLING},
    "inkling2_loop_text": {**CAP, **_INKLING},
    "recurrent_gemma": {"logits_soft_cap": 5.0, "block_types": ["recurrent", "attention"], "num_hidden_layers": 2,
                        "lru_width": 32, "attention_window_size": 16, "num_key_value_heads": 2},  # fmt: skip
    "xlstm": {"output_logit_soft_cap": 5.0, "embedding_dim": 32, "num_heads": 2, "num_blocks": 1, "chunk_size": 4,
              "mode": "train", "use_cache": False},  # fmt: skip
}
_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 8}  # fmt: skip
# multimodal wrappers AutoModelForCausalLM loads: the cap of the text config (Gemma3's forward ignores it)
MULTIMODAL = {
    "gemma4": {"vision_config": _VISION},
    "gemma4_unified": {
        "vision_config": {**_VISION, "mm_embed_dim": 16, "mm_posemb_size": 8, "output_proj_dims": 16, "patch_size": 4}
    },
    "gemma3": {"vision_config": _VISION},
}
UNSCALED = {"llama", "gemma3"}  # whose forward is plain `lm_head(hidden)`


def _build(model_type: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if model_type in MULTIMODAL:
        cfg = AutoConfig.for_model(model_type, text_config={**BASE, **CAP, **_PER_LAYER}, **MULTIMODAL[model_type])
    else:
        cfg = AutoConfig.for_model(model_type, **{**BASE, **ARCHITECTURES[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()  # float64 for MoE too
    with torch.no_grad():  # logits spread over several units, so that scales and caps matter (see module doc)
        model.get_output_embeddings().weight.mul_(30.0)
    return model.to(dtype)


def _batch() -> dict[str, torch.Tensor]:
    """Three right-padded rows, prompts of 3 tokens, ids in [3, UNPADDED)."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, UNPADDED, (3, 16), generator=gen)  # xLSTM: a multiple of its chunk size
    attention = torch.ones_like(input_ids)
    attention[1, 9:] = 0
    input_ids[1, 9:] = 0
    completion = attention.bool().clone()
    completion[:, :3] = False
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def _logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kwargs)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L1 distance of two vectors of summed log-probs."""
    return ((a.double() - b.double()).abs().sum() / b.double().abs().sum()).item()


def _float64_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The model's own forward, in float64 throughout (None for a model whose code pins float32 somewhere)."""
    try:
        logits = copy.deepcopy(model).double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except RuntimeError:
        return None
    logp = torch.log_softmax(logits.logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def _noise_floor(model: torch.nn.Module, batch: dict[str, torch.Tensor], want: torch.Tensor) -> float:
    """float32 rounding of the model's forward, measured against float64; at least one float32 epsilon, the
    resolution of the float32 sums `sequence_logps` returns."""
    exact = _float64_logps(model, batch)
    measured = 0.0 if exact is None else _rel(want, exact)
    return max(measured, torch.finfo(torch.float32).eps)


def _naive_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decoder, then the bare output embedding: what the fast path computed before it knew any head maths."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = model.get_output_embeddings()(hidden.last_hidden_state)[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


class _ForwardCalls:
    """Counts calls of a model's own forward (the fast path calls only its decoder)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def _guard_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("madpo")]


@pytest.mark.parametrize("model_type", [*ARCHITECTURES, *MULTIMODAL])
def test_fast_path_equals_forward_for_every_head_scaling(model_type, monkeypatch, caplog):
    model = _build(model_type)
    batch = _batch()
    calls = _ForwardCalls(model)
    with torch.no_grad():
        want = _logps(model, batch, fast=False)
        floor = _noise_floor(model, batch, want)
        naive = _naive_logps(model, batch)
    tol = 10 * floor  # both paths round like the forward, in different orders
    if model_type in UNSCALED:
        assert _rel(naive, want) <= tol
    else:  # the factor is large enough that skipping the head maths is far outside the tolerance
        assert _rel(naive, want) > 100 * tol
    calls.n = 0
    with_grad = _logps(model, batch)  # first use: the guard probes once, with one forward of its own
    assert with_grad.requires_grad and calls.n <= 1
    assert _rel(with_grad.detach(), want) <= tol, (_rel(with_grad.detach(), want), floor)
    monkeypatch.setattr(modeling, "_NO_GRAD_CHUNK_ELEMENTS", 5 * VOCAB)  # several chunks
    calls.n = 0
    with torch.no_grad():
        chunked = _logps(model, batch)
    assert calls.n == 0  # the fast path itself: the model's forward is not called again
    assert _rel(chunked, want) <= tol, (_rel(chunked, want), floor)
    assert _guard_warnings(caplog) == []


@pytest.mark.parametrize("model_type", ["granite", "cohere", "minicpm3", "gemma2"])
def test_fast_path_gradients_equal_forward(model_type):
    model = _build(model_type)
    batch = _batch()
    weights = torch.tensor([1.0, -0.5, 0.25])
    params = [p for p in model.parameters() if p.requires_grad]
    fast = torch.autograd.grad((weights * _logps(model, batch)).sum(), params, allow_unused=True)
    full = torch.autograd.grad((weights * _logps(model, batch, fast=False)).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), fast, full, strict=True):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # float32 rounding, as in the other tests


class _ScaledLlama(LlamaForCausalLM):
    """A Llama whose forward multiplies its logits by 1.7: head maths the fast path does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.7
        return out


def _scaled_llama(dtype: torch.dtype = torch.float32, **config) -> _ScaledLlama:
    torch.manual_seed(0)
    model = _ScaledLlama(LlamaConfig(**{**BASE, **config})).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model.to(dtype)


def _assert_one_fallback_warning(caplog: pytest.LogCaptureFixture) -> None:
    warnings = _guard_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "_ScaledLlama" in warnings[0] and "differs from the model's own forward" in warnings[0]


def test_unknown_head_maths_falls_back_to_forward_with_one_warning(caplog):
    model = _scaled_llama()
    batch = _batch()
    with torch.no_grad():
        want = _logps(model, batch, fast=False)
        assert _rel(_naive_logps(model, batch), want) > 1e-2  # what the fast path alone would give
    calls = _ForwardCalls(model)
    got = _logps(model, batch)
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)  # the full path itself
    _assert_one_fallback_warning(caplog)
    (grad,) = torch.autograd.grad(got.sum(), [model.model.layers[0].mlp.up_proj.weight])
    assert grad.abs().sum() > 0
    with torch.no_grad():
        again = _logps(model, batch)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    _assert_one_fallback_warning(caplog)  # decided once: no second warning, no second probe
    assert calls.n == 3  # probe, first call, second call


def test_guard_sees_through_peft(caplog):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    batch = _batch()
    scaled = get_peft_model(_scaled_llama(), lora)
    with torch.no_grad():
        torch.testing.assert_close(_logps(scaled, batch), _logps(scaled, batch, fast=False), rtol=0, atol=0)
    _assert_one_fallback_warning(caplog)
    caplog.clear()
    granite = get_peft_model(_build("granite"), copy.deepcopy(lora))
    calls = _ForwardCalls(granite.get_base_model())
    got = _logps(granite, batch)
    assert got.requires_grad and calls.n == 1  # the probe; then the fast path
    torch.testing.assert_close(got.detach(), _logps(granite, batch, fast=False).detach(), rtol=1e-5, atol=1e-5)
    assert _guard_warnings(caplog) == []


@pytest.mark.parametrize("precision", ["bf16-weights", "bf16-autocast"])
def test_guard_under_bfloat16(precision, caplog):
    dtype = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"), torch.no_grad():
        granite = _build("granite", dtype)
        got, want = _logps(granite, batch), _logps(granite, batch, fast=False)
        assert _guard_warnings(caplog) == []  # known head maths: the fast path stays on
        assert _rel(got, want) < 1e-2  # bfloat16 has 8 significant bits
        scaled = _scaled_llama(dtype)
        torch.testing.assert_close(_logps(scaled, batch), _logps(scaled, batch, fast=False), rtol=0, atol=0)
    _assert_one_fallback_warning(caplog)


def test_probe_runs_in_eval_mode_and_restores_every_module_mode(caplog):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BASE, attention_dropout=0.5)).train()
    model.model.norm.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    batch = _batch()
    _logps(model, batch)  # dropout differs between the two paths in training mode: a train-mode probe would fail
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert _guard_warnings(caplog) == []
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(_logps(model, batch), _logps(model, batch, fast=False), rtol=1e-5, atol=1e-5)


def test_batch_too_short_to_probe_uses_forward_and_decides_nothing(caplog):
    model = _scaled_llama()
    calls = _ForwardCalls(model)
    one = {k: v[:, :1] for k, v in _batch().items()}  # a single token per row: nothing to probe
    with torch.no_grad():
        _logps(model, one)
        assert calls.n == 1 and _guard_warnings(caplog) == []
        batch = _batch()
        torch.testing.assert_close(_logps(model, batch), _logps(model, batch, fast=False), rtol=0, atol=0)
    _assert_one_fallback_warning(caplog)
