"""Bounded memory at large vocabularies: with a frozen head, token log-probs with autograd run in chunks whose
gradient rows are taken in the forward pass, equal in value and gradient to the full computation, and no positions x
vocabulary tensor is kept for backward. Gradient checkpointing gives the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

import madpo.modeling as modeling
from madpo.modeling import build_causal_lm, load_tokenizer, sequence_logps
from tests.conftest import TINY_LLAMA


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 24))
    mask = torch.ones_like(ids)
    mask[2:, 18:] = 0  # right padding
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 6:] = True
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion & mask.bool()}


def _model(model_type: str, **config) -> torch.nn.Module:
    tok = load_tokenizer(TINY_LLAMA)
    model = build_causal_lm(
        tok,
        model_type=model_type,
        seed=0,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        **config,
    )
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # spread the logits, so the head maths matter
    model.get_output_embeddings().requires_grad_(False)
    model.get_input_embeddings().requires_grad_(False)  # a tied head would otherwise train through the embedding
    return model


def _logps_and_grads(model: torch.nn.Module, batch: dict, chunk_elements: int) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    previous, modeling.GRAD_CHUNK_ELEMENTS = modeling.GRAD_CHUNK_ELEMENTS, chunk_elements
    try:
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    finally:
        modeling.GRAD_CHUNK_ELEMENTS = previous
    # a loss that weights rows differently, as DPO's does
    (logps * torch.linspace(-1.0, 2.0, logps.shape[0])).sum().backward()
    return logps.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    ("model_type", "config"),
    [("llama", {}), ("granite", {"logits_scaling": 4.0}), ("gemma2", {"final_logit_softcapping": 5.0, "head_dim": 8})],
)
def test_chunked_frozen_head_equals_the_full_computation(model_type, config, batch) -> None:
    model = _model(model_type, **config)
    vocab = model.get_output_embeddings().out_features
    full, full_grads = _logps_and_grads(model, batch, 0)
    chunked, chunked_grads = _logps_and_grads(model, batch, 5 * vocab)  # chunks of 5 positions, the last one shorter
    # the noise floor: the same full computation in float64
    wide, wide_grads = _logps_and_grads(model.double(), batch, 0)
    model.float()
    floor = (full - wide).abs().max().item()
    torch.testing.assert_close(chunked, full, rtol=0, atol=10 * floor + 1e-6)
    for g_chunked, g_full, g_wide in zip(chunked_grads, full_grads, wide_grads, strict=True):
        grad_floor = (g_full.double() - g_wide).abs().max().item()
        assert (g_chunked - g_full).abs().max().item() <= 10 * grad_floor + 1e-7


def test_no_positions_by_vocabulary_tensor_is_kept_for_backward(batch) -> None:
    model = _model("llama")
    vocab = model.get_output_embeddings().out_features
    n_targets = int(batch["completion_mask"][:, 1:].sum())

    weights = {p.data_ptr() for p in model.parameters()}

    def largest_saved(chunk_elements: int) -> int:
        """The largest activation autograd keeps for backward (parameters left out)."""
        sizes: list[int] = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in weights:
                sizes.append(t.numel())
            return t

        previous, modeling.GRAD_CHUNK_ELEMENTS = modeling.GRAD_CHUNK_ELEMENTS, chunk_elements
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        finally:
            modeling.GRAD_CHUNK_ELEMENTS = previous
        return max(sizes)

    assert largest_saved(0) >= n_targets * vocab  # the full path keeps a targets x vocabulary buffer
    assert largest_saved(5 * vocab) < n_targets * vocab / 4
    # the per-call switch (PolicyLightningModule(chunked_head=False) passes 0) wins over the module setting
    sizes: list[int] = [0]
    previous, modeling.GRAD_CHUNK_ELEMENTS = modeling.GRAD_CHUNK_ELEMENTS, 5 * vocab
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            sequence_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_elements=0
            )
    finally:
        modeling.GRAD_CHUNK_ELEMENTS = previous
    assert max(sizes) >= n_targets * vocab


def test_a_trained_head_is_not_chunked(batch) -> None:
    model = _model("llama")
    model.get_output_embeddings().requires_grad_(True)
    full, full_grads = _logps_and_grads(model, batch, 0)
    same, same_grads = _logps_and_grads(model, batch, 5 * model.get_output_embeddings().out_features)
    assert torch.equal(full, same) and all(torch.equal(a, b) for a, b in zip(full_grads, same_grads, strict=True))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch) -> None:
    results = []
    for checkpointing in (False, True):
        model = _model("llama")
        model.get_output_embeddings().requires_grad_(True)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        results.append(_logps_and_grads(model, batch, 0))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)
    for a, b in zip(plain_grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
