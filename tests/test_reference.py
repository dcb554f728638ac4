"""The reference model is the initial policy in every configuration, on the policy's device in every loop, and its
cached log-probs are shared by runs that differ only in the seed of a fresh adapter."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import datasets
import lightning as L
import pytest
import torch

import madpo.scoring as scoring
from madpo.data import PreferenceDataModule
from madpo.losses import DPOLoss, SFTLoss
from madpo.modeling import sequence_logps
from madpo.modules import LoraOptions, PolicyLightningModule
from tests.conftest import DATA, TINY_LLAMA

SMALL = {"tokenizer": TINY_LLAMA, "max_length": 48, "max_prompt_length": 12, "batch_size": 4}


@pytest.fixture(autouse=True)
def isolated_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def pairs() -> datasets.Dataset:
    return datasets.Dataset.from_json(str(DATA / "pairs_train.jsonl")).select(range(8))


def _batch(pairs: datasets.Dataset) -> dict[str, torch.Tensor]:
    dm = PreferenceDataModule.from_datasets(pairs, **{**SMALL, "batch_size": len(pairs)})
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0]


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> str:
    """An SFT adapter that really moved the model (LoRA B away from zero)."""
    module = PolicyLightningModule(TINY_LLAMA, loss=SFTLoss(), lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("adapter") / "sft"
    module.model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("reference", ["precomputed", "online"])
def test_a_loaded_adapter_that_keeps_training_is_part_of_the_reference(trained_adapter, pairs, reference):
    lora = LoraOptions(r=4, alpha=8, dropout=0.0, adapter_path=trained_adapter, freeze_loaded_adapter=False)
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), lora=lora, reference=reference)
    module.setup("fit")
    batch = _batch(pairs)
    n = batch["index"].numel()
    policy = _logps(module.model, batch)
    with module.reference_model() as ref:
        reference_logps = _logps(ref, batch)
    with module.model.disable_adapter():
        base = _logps(module.model, batch)
    # the reference is a merged copy of the policy: equal up to the rounding of W + BA, far below what dropping the
    # adapter moves (the old reference, the bare base model)
    rounding = (reference_logps - policy).abs().max().item()
    adapter_effect = (base - policy).abs().max().item()
    assert adapter_effect > 1e-2 and rounding < 1e-3 * adapter_effect, (rounding, adapter_effect)
    if reference == "precomputed":
        batch = {**batch, "ref_chosen_logps": reference_logps[:n], "ref_rejected_logps": reference_logps[n:]}
    _, stats, _ = module.compute(batch, "train")
    # at step 0 the policy is the reference: implicit margin 0 and loss ln 2
    assert stats["rewards/margins"].abs().max().item() <= 0.1 * 2 * rounding + 1e-6
    assert stats["loss"].mean().item() == pytest.approx(math.log(2), abs=1e-4)


def test_a_frozen_loaded_adapter_is_merged_into_the_reference_and_a_fresh_one_is_disabled(trained_adapter, pairs):
    lora = LoraOptions(r=4, alpha=8, dropout=0.0, adapter_path=trained_adapter, freeze_loaded_adapter=True)
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), lora=lora)
    batch = _batch(pairs)
    with module.reference_model() as ref:
        reference_logps = _logps(ref, batch)
    torch.testing.assert_close(reference_logps, _logps(module.model, batch), rtol=1e-5, atol=1e-5)


def test_the_online_reference_follows_the_policy_to_its_device(monkeypatch):
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), reference="online")
    module.setup("validate")  # no on_fit_start: validate, test and predict never call it
    # stand in for a GPU: the module reports another device; the reference must be moved there before it is used
    monkeypatch.setattr(PolicyLightningModule, "device", property(lambda self: torch.device("meta")))
    ref = module._online_reference_model()
    assert next(ref.parameters()).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_validate_with_an_online_reference_on_a_gpu(pairs, tmp_path):
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), reference="online", export=False)
    dm = PreferenceDataModule.from_datasets(pairs, pairs, **SMALL, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(module, datamodule=dm)
    assert metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert next(module._online_reference[0].parameters()).is_cuda


def test_reference_cache_is_shared_across_fresh_adapter_seeds(pairs, tmp_path, monkeypatch):
    calls = []
    real = scoring.score_reference_logps
    monkeypatch.setattr(scoring, "score_reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))

    def setup(seed: int) -> PreferenceDataModule:
        torch.manual_seed(seed)  # a fresh adapter's A matrices are random: another seed, other A
        module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(), lora=LoraOptions(r=4, alpha=8, dropout=0.0))
        dm = PreferenceDataModule.from_datasets(pairs, **SMALL, cache_dir=str(tmp_path / "cache"))
        dm.trainer = SimpleNamespace(
            lightning_module=module,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
            precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext, precision="32-true"),
        )
        dm.setup("fit")
        return dm

    first = setup(0)
    second = setup(1)
    assert len(calls) == 1 and second.stats["train"]["reference_logps"]["cache"] == "hit"
    assert first.train_dataset["ref_chosen_logps"] == second.train_dataset["ref_chosen_logps"]
