import math

import pytest
import torch

from madpo import losses as L
from madpo.data import PreferenceDataModule
from madpo.losses import BetaDPOLoss, DPOLoss, IPOLoss, MADPOLoss, SFTLoss
from madpo.modeling import sequence_logps
from madpo.modules import LoraOptions, PolicyLightningModule
from tests.conftest import DATA, TINY_LLAMA


def _batch(n: int = 6, files: str = "pairs_train.jsonl") -> dict[str, torch.Tensor]:
    dm = PreferenceDataModule(
        train_files=str(DATA / files), tokenizer=TINY_LLAMA, max_length=48, max_prompt_length=12, batch_size=n
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _with_reference(module: PolicyLightningModule, batch: dict) -> dict:
    n = batch["index"].numel()
    with module.reference_model() as ref, torch.no_grad():
        logps, _ = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return {**batch, "ref_chosen_logps": logps[:n], "ref_rejected_logps": logps[n:]}


def _perturb(module: PolicyLightningModule) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))


def test_madpo_with_unit_weights_equals_dpo_in_loss_and_gradients():
    dpo = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss())
    madpo = PolicyLightningModule(TINY_LLAMA, loss=MADPOLoss(c_max=1.0))
    batch = _with_reference(dpo, _batch())
    batch["rm_margin"] = torch.linspace(-8, 8, batch["index"].numel())
    _perturb(dpo)
    _perturb(madpo)  # same seed: identical policies, away from the reference
    loss_dpo, stats_dpo, _ = dpo.compute(batch, "train")
    loss_madpo, stats_madpo, _ = madpo.compute(batch, "train")
    assert loss_dpo.item() != pytest.approx(math.log(2), abs=1e-4)  # the policies really moved off the reference
    torch.testing.assert_close(loss_madpo, loss_dpo, rtol=0, atol=0)
    loss_dpo.backward()
    loss_madpo.backward()
    for (name, a), (_, b) in zip(dpo.model.named_parameters(), madpo.model.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    assert stats_madpo["madpo/weight_mean"].eq(1).all()


def test_dpo_step_matches_hand_computation():
    module = PolicyLightningModule(TINY_LLAMA, loss=MADPOLoss(beta=0.1))
    batch = _with_reference(module, _batch())
    n = batch["index"].numel()
    batch["rm_margin"] = torch.tensor([0.5, 2.0, -1.0, 8.0, -9.0, 0.0])
    _perturb(module)
    loss, stats, _ = module.compute(batch, "train")
    logps, _ = sequence_logps(
        module.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], fast=False
    )
    expected = 0.0
    for i in range(n):
        h = (logps[i] - batch["ref_chosen_logps"][i]) - (logps[n + i] - batch["ref_rejected_logps"][i])
        m = batch["rm_margin"][i].item()
        c_max, tau = 4.0, math.log(999.0)
        c_min, k = 1 / c_max, (c_max - 1) / (1 - 1 / c_max)
        c = c_min + (c_max - c_min) / (1 + k * math.exp(abs(m) - tau))
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        w = sig(c * m) / sig(m) if m > -tau else 1.0
        expected += w * -math.log(sig(0.1 * h.item()))
    assert loss.item() == pytest.approx(expected / n, rel=1e-5)
    assert stats["rewards/chosen"][0].item() == pytest.approx(
        0.1 * (logps[0] - batch["ref_chosen_logps"][0]).item(), rel=1e-5
    )


def test_ipo_length_normalised_uses_token_counts():
    module = PolicyLightningModule(TINY_LLAMA, loss=IPOLoss(length_normalize=True))
    batch = _with_reference(module, _batch())
    _perturb(module)
    n = batch["index"].numel()
    loss, _, _ = module.compute(batch, "train")
    logps, counts = sequence_logps(module.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    c = counts.float()
    h = (logps[:n] - batch["ref_chosen_logps"]) / c[:n] - (logps[n:] - batch["ref_rejected_logps"]) / c[n:]
    torch.testing.assert_close(loss, ((h - 5.0) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_sft_loss_is_token_mean_nll_of_completions():
    module = PolicyLightningModule(TINY_LLAMA, loss=SFTLoss())
    batch = _batch(files="sft_train.jsonl")
    loss, _, _ = module.compute(batch, "train")
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    mask = batch["completion_mask"][:, 1:]
    torch.testing.assert_close(loss, (nll * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


def test_online_reference_is_outside_checkpoint_and_optimizer():
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), reference="online")
    module.setup("fit")
    assert len(module._online_reference) == 1
    keys = module.state_dict().keys()
    assert all(k.startswith(("model.", "metrics.")) for k in keys), [k for k in keys if not k.startswith("model.")]
    n_model = sum(p.numel() for p in module.model.parameters())
    assert sum(p.numel() for p in module.parameters()) == n_model
    batch = _batch()
    _perturb(module)
    loss_online, _, _ = module.compute(batch, "train")
    loss_pre, _, _ = module.compute(_with_reference(PolicyLightningModule(TINY_LLAMA, loss=DPOLoss()), batch), "train")
    torch.testing.assert_close(loss_online, loss_pre, rtol=1e-5, atol=1e-6)


def test_precomputed_reference_missing_is_a_clear_error():
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss())
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        module.compute(_batch(), "train")


def test_madpo_without_margins_is_a_clear_error():
    module = PolicyLightningModule(TINY_LLAMA, loss=MADPOLoss())
    with pytest.raises(ValueError, match="reward_model"):
        module.compute(_with_reference(module, _batch()), "train")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PolicyLightningModule(TINY_LLAMA, loss="kto"), "PreferenceLoss"),
        (lambda: MADPOLoss(c_min=1.5), "c_min"),
        (lambda: MADPOLoss(tau=0.0), "tau"),
        (lambda: MADPOLoss(variant="x"), "variant"),
        (lambda: DPOLoss(beta=0.0), "beta"),
        (lambda: PolicyLightningModule(TINY_LLAMA, reference="none"), "reference"),
    ],
)
def test_invalid_options_raise_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_data_requirements_follow_the_loss():
    losses = {"sft": SFTLoss(), "dpo": DPOLoss(), "madpo": MADPOLoss()}
    req = {name: PolicyLightningModule(TINY_LLAMA, loss=loss).data_requirements() for name, loss in losses.items()}
    assert (req["sft"].pairs, req["sft"].reference_logps, req["sft"].rm_margin) == (False, False, False)
    assert (req["dpo"].pairs, req["dpo"].reference_logps, req["dpo"].rm_margin) == (True, True, False)
    assert req["madpo"].rm_margin
    online = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), reference="online").data_requirements()
    assert not online.reference_logps


def test_beta_dpo_state_is_checkpointed():
    module = PolicyLightningModule(TINY_LLAMA, loss=BetaDPOLoss())
    batch = _with_reference(module, _batch())
    _perturb(module)
    module.compute(batch, "train")
    state = module.state_dict()
    assert state["loss.step"].item() == 1
    assert state["loss.gap_std"].item() > 0
    before = state["loss.gap_mean"].clone()
    module.compute(batch, "val")  # evaluation reads the EMA, never updates it
    assert module.state_dict()["loss.gap_mean"].equal(before)
    assert module.state_dict()["loss.step"].item() == 1


def test_non_finite_loss_names_step_batch_and_pairs():
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss())
    batch = _with_reference(module, _batch())
    batch["ref_chosen_logps"][2] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"global step 0, batch 5.*indices.*\[" + str(batch["index"][2].item())
    ):
        module._step(batch, 5, "train")


def test_lora_trains_only_the_adapter_and_disabled_adapter_is_the_base():
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = _batch()
    base = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss())
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # move the adapter away from its zero init
        with module.reference_model() as ref:
            ref_logps, _ = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        base_logps, _ = sequence_logps(
            base.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        adapted, _ = sequence_logps(module.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    torch.testing.assert_close(ref_logps, base_logps, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base_logps)
    frozen_before = {n: p.clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    loss, _, _ = module.compute(_with_reference(module, batch), "train")
    loss.backward()
    torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=0.1).step()
    for n, p in module.model.named_parameters():
        if not p.requires_grad:
            assert p.equal(frozen_before[n]), n


def test_beta_dpo_loss_matches_module_output():
    module = PolicyLightningModule(TINY_LLAMA, loss=BetaDPOLoss(rho=0.5))
    batch = _with_reference(module, _batch())
    _perturb(module)
    twin = L.BetaDPO(beta=0.1, alpha=0.6, rho=0.5)
    loss, stats, scalars = module.compute(batch, "train")
    n = batch["index"].numel()
    logps, _ = sequence_logps(module.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    out = twin(logps[:n].detach(), logps[n:].detach(), batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    torch.testing.assert_close(loss.detach(), out.losses.mean(), rtol=1e-5, atol=1e-6)
    assert stats["beta_dpo/kept"].sum().item() == n // 2
    torch.testing.assert_close(scalars["beta/effective"], out.beta)


def test_non_finite_loss_can_be_skipped_and_counted():
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), on_nonfinite_loss="skip")
    batch = _with_reference(module, _batch())
    batch["ref_chosen_logps"][1] = float("inf")
    assert module._step(batch, 0, "train") is None
    assert module.nonfinite_steps_skipped == 1
    with pytest.raises(FloatingPointError):  # validation never skips silently
        module._step(batch, 0, "val")
