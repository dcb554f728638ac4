"""Speed work never changes the maths: each optimisation against the straightforward computation.

- `sequence_logps` (decoder once, LM head at completion positions only, selective log-softmax; chunked without
  autograd) = full logits + `log_softmax` over the vocabulary + gather + sum: log-probs to 1e-5, gradients, the DPO
  loss of a policy step;
- fused AdamW (the default where torch has the kernel) = the loop implementation;
- `group_by_length`: still a permutation per epoch, seeded by (seed, epoch), resumable, the same global batches for
  1 and N processes, and less padding than the plain shuffle.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import madpo.modeling as modeling
from madpo import losses as L
from madpo.data import PreferenceDataModule
from madpo.data.datamodule import LengthGroupedSampler, length_grouped_order, row_lengths
from madpo.data.loader import ResumableSampler
from madpo.losses import DPOLoss
from madpo.modeling import _SelectiveLogSoftmax, load_causal_lm, sequence_logps
from madpo.modules import PolicyLightningModule
from madpo.modules.base import OptimizerOptions, _fused_adamw_supported
from tests.conftest import DATA, TINY_LLAMA


def _datamodule(batch_size: int = 6, max_length: int = 48, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        train_files=str(DATA / "pairs_train.jsonl"),
        tokenizer=TINY_LLAMA,
        max_length=max_length,
        max_prompt_length=12,
        batch_size=batch_size,
        **kwargs,
    )
    dm.setup("fit")
    return dm


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    return next(iter(_datamodule(n).train_dataloader()))


def straightforward_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full logits at every position, log_softmax over the whole vocabulary, gather, mask, sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(1)


def _fast(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0]


def _perturbed_model() -> torch.nn.Module:
    model = load_causal_lm(TINY_LLAMA)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------------------------------------------------
# log-probs


def test_selective_log_softmax_equals_cross_entropy_values_and_gradients():
    torch.manual_seed(0)
    logits = (3 * torch.randn(37, 101)).requires_grad_()
    targets = torch.randint(0, 101, (37,))
    weights = torch.randn(37)
    fast = _SelectiveLogSoftmax.apply(logits, targets)
    (g_fast,) = torch.autograd.grad((weights * fast).sum(), logits)
    slow = -F.cross_entropy(logits, targets, reduction="none")
    (g_slow,) = torch.autograd.grad((weights * slow).sum(), logits)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-6)


def test_selective_log_softmax_float64_matches_cross_entropy_to_rounding():
    torch.manual_seed(0)
    logits = (5 * torch.randn(9, 13, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 13, (9,))
    weights = torch.randn(9, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((weights * _SelectiveLogSoftmax.apply(logits.double(), targets)).sum(), logits)
    (g_slow,) = torch.autograd.grad((weights * -F.cross_entropy(logits, targets, reduction="none")).sum(), logits)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-6, atol=1e-6)


def test_selective_log_softmax_bf16_logits_computed_in_float32():
    torch.manual_seed(0)
    logits = (4 * torch.randn(16, 64)).bfloat16().requires_grad_()
    targets = torch.randint(0, 64, (16,))
    fast = _SelectiveLogSoftmax.apply(logits, targets)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, -F.cross_entropy(logits.float(), targets, reduction="none"), rtol=1e-5, atol=1e-5)
    fast.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_selective_log_softmax_refuses_a_second_backward():
    logits = torch.randn(4, 9, requires_grad=True)
    out = _SelectiveLogSoftmax.apply(logits * 1.0, torch.tensor([0, 1, 2, 3]))
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_sequence_logps_equals_straightforward_with_and_without_grad(monkeypatch):
    model = _perturbed_model()
    batch = _batch()
    expected = straightforward_logps(model, batch).detach()
    with_grad = _fast(model, batch)
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(modeling, "_NO_GRAD_CHUNK_ELEMENTS", 7 * model.config.vocab_size)  # several chunks of 7
    with torch.no_grad():
        chunked = _fast(model, batch)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    full, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], fast=False)
    torch.testing.assert_close(full.detach(), expected, rtol=1e-5, atol=1e-5)


def test_sequence_logps_gradients_equal_straightforward_for_every_parameter():
    model = _perturbed_model()
    batch = _batch()
    weights = torch.linspace(-1, 1, batch["input_ids"].shape[0])
    params = [p for p in model.parameters() if p.requires_grad]
    fast = torch.autograd.grad((weights * _fast(model, batch)).sum(), params)
    slow = torch.autograd.grad((weights * straightforward_logps(model, batch)).sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # float32 rounding; |grad| up to ~10


def test_sequence_logps_with_final_logit_softcapping():
    cfg = AutoConfig.for_model(
        "gemma2",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    input_ids = torch.randint(1, 96, (3, 10))
    attention = torch.ones_like(input_ids)
    completion = torch.zeros_like(input_ids, dtype=torch.bool)
    completion[:, 4:] = True
    batch = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
    expected = straightforward_logps(model, batch)
    torch.testing.assert_close(_fast(model, batch), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(_fast(model, batch), expected.detach(), rtol=1e-5, atol=1e-5)


def test_policy_dpo_loss_equals_straightforward_computation():
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(beta=0.1))
    batch = _batch()
    n = batch["index"].numel()
    with module.reference_model() as ref, torch.no_grad():
        ref_logps = straightforward_logps(ref, batch)
    batch = {**batch, "ref_chosen_logps": ref_logps[:n], "ref_rejected_logps": ref_logps[n:]}
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, _, _ = module.compute(batch, "train")
    logps = straightforward_logps(module.model, batch)
    margin = (logps[:n] - ref_logps[:n]) - (logps[n:] - ref_logps[n:])
    expected = -F.logsigmoid(0.1 * margin).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        L.dpo_losses(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=0.1).mean(), expected
    )


# ----------------------------------------------------------------------------------------------------------------------
# fused AdamW


def test_fused_adamw_update_equals_loop_implementation():
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (32, 16)]
    loop = [torch.randn(s, requires_grad=True) for s in shapes]
    fused = [p.detach().clone().requires_grad_() for p in loop]
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}
    opt_loop = torch.optim.AdamW(loop, **kwargs, foreach=False)
    opt_fused = torch.optim.AdamW(fused, **kwargs, fused=_fused_adamw_supported(fused) or None)
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(loop, fused, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_loop.step()
        opt_fused.step()
    for p, q in zip(loop, fused, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_configure_optimizers_uses_fused_adamw_where_available():
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), optimizer=OptimizerOptions(schedule="constant"))
    trainer = {"estimated_stepping_batches": 10, "precision": "32-true", "gradient_clip_val": None}
    module.trainer = type("T", (), trainer)()  # what configure_optimizers reads from the Trainer
    expected = _fused_adamw_supported([p for p in module.parameters() if p.requires_grad])
    assert expected == ("cpu" in torch.utils._foreach_utils._get_fused_kernels_supported_devices())
    optimizer = module.configure_optimizers()["optimizer"]
    assert bool(optimizer.defaults.get("fused")) == expected
    module.optimizer_options = OptimizerOptions(schedule="constant", fused=False)
    assert not module.configure_optimizers()["optimizer"].defaults.get("fused")


# ----------------------------------------------------------------------------------------------------------------------
# group_by_length


def _padding(order: list[int], lengths: list[int], batch: int) -> int:
    """Pad positions of a batch layout: Σ over batches of (longest * rows - Σ lengths)."""
    total = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        total += max(chunk) * len(chunk) - sum(chunk)
    return total


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    torch.manual_seed(0)
    lengths = torch.randint(5, 120, (203,)).tolist()
    order = length_grouped_order(lengths, 8, seed=3)
    assert sorted(order) == list(range(203))
    assert order == length_grouped_order(lengths, 8, seed=3)
    assert order != length_grouped_order(lengths, 8, seed=4)
    assert max(lengths[i] for i in order[:8]) == max(lengths)  # the longest batch first
    shuffled = torch.randperm(203, generator=torch.Generator().manual_seed(3)).tolist()
    assert _padding(order, lengths, 8) < 0.5 * _padding(shuffled, lengths, 8)
    assert len(order[200:]) == 3  # the partial batch stays last


@pytest.mark.parametrize("world", [2, 3])
def test_length_grouped_sampler_same_global_batches_for_any_world_size(world):
    dm = _datamodule()
    ds = dm.train_dataset
    lengths = row_lengths(ds)
    per_rank = 2
    single = LengthGroupedSampler(ds, lengths=lengths, global_batch_size=per_rank * world, num_replicas=1, rank=0)
    ranks = [
        LengthGroupedSampler(ds, lengths=lengths, global_batch_size=per_rank * world, num_replicas=world, rank=r)
        for r in range(world)
    ]
    for epoch in (0, 1):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        one = list(single)
        shares = [list(s) for s in ranks]
        n_batches = len(one) // (per_rank * world)
        for k in range(n_batches):
            together = sorted(i for share in shares for i in share[k * per_rank : (k + 1) * per_rank])
            assert together == sorted(one[k * per_rank * world : (k + 1) * per_rank * world])
    epoch1 = list(single)
    single.set_epoch(0)
    assert list(single) != epoch1  # epoch-seeded: another epoch, another order


def test_length_grouped_sampler_resumes_inside_an_epoch():
    dm = _datamodule()
    ds = dm.train_dataset
    sampler = LengthGroupedSampler(ds, lengths=row_lengths(ds), global_batch_size=6, num_replicas=1, rank=0, seed=5)
    assert isinstance(sampler, ResumableSampler)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume_at(2, 12)
    assert list(sampler) == full[12:]
    assert list(sampler) == full  # the resume offset applies once


def test_datamodule_group_by_length_serves_every_pair_once_per_epoch_with_less_padding():
    grouped = _datamodule(batch_size=8, max_length=160, group_by_length=True)  # long enough for varied lengths
    plain = _datamodule(batch_size=8, max_length=160)
    loader = grouped.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    batches = list(loader)
    seen = sorted(i for b in batches for i in b["index"].tolist())
    assert seen == sorted(grouped.train_dataset["index"])
    width = sum(b["input_ids"].numel() for b in batches)
    plain_width = sum(b["input_ids"].numel() for b in plain.train_dataloader())
    assert width < plain_width
    assert not isinstance(plain.train_dataloader().sampler, LengthGroupedSampler)  # default off
