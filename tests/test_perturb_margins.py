"""madpo.pipeline.margins.perturb_margins: the robustness runs' perturbation of the training rm_margin (seeded,
counted, the same numbers as when the DataModule applied it), and its way into a PreferenceDataModule."""

import datasets
import pytest
import torch

from madpo.data import PreferenceDataModule
from madpo.pipeline.margins import perturb_margins
from madpo.pipeline.stages import _with_rm_margin
from tests.conftest import DATA, TINY_LLAMA

SMALL = {"tokenizer": TINY_LLAMA, "max_length": 48, "max_prompt_length": 12, "batch_size": 4}
MARGINS = [float(i) - 5.5 for i in range(12)]


def old_formula(margins, noise_std, flip_fraction, seed):
    """The perturbation as `PreferenceDataModule._perturb_margins` computed it before it moved to the pipeline."""
    m = torch.tensor(margins, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 7919)
    noise = torch.randn(len(m), generator=generator, dtype=torch.float64) * noise_std
    n_flip = round(flip_fraction * len(m))
    flip = torch.zeros(len(m), dtype=torch.bool)
    flip[torch.randperm(len(m), generator=generator)[:n_flip]] = True
    return torch.where(flip, -(m + noise), m + noise)


@pytest.fixture(autouse=True)
def isolated_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))


def test_flips_are_seeded_and_counted():
    got, stats = perturb_margins(MARGINS, noise_std=0.0, flip_fraction=0.25, seed=0)
    assert got.dtype == torch.float64 and got.shape == (12,)
    flipped = [i for i, (a, b) in enumerate(zip(MARGINS, got.tolist(), strict=True)) if a == -b and a != 0]
    assert len(flipped) == 3 and stats["flipped"] == 3 and stats["noise_std"] == 0.0
    assert all(a == b for i, (a, b) in enumerate(zip(MARGINS, got.tolist(), strict=True)) if i not in flipped)
    again, _ = perturb_margins(MARGINS, noise_std=0.0, flip_fraction=0.25, seed=0)
    assert torch.equal(again, got)
    other, _ = perturb_margins(MARGINS, noise_std=0.0, flip_fraction=0.25, seed=1)
    assert not torch.equal(other, got)
    assert stats["mean_abs_change"] == pytest.approx(float((got - torch.tensor(MARGINS)).abs().mean()))


def test_noise_is_seeded_gaussian():
    noisy, stats = perturb_margins(MARGINS, noise_std=1.0, flip_fraction=0.0, seed=0)
    diffs = noisy - torch.tensor(MARGINS, dtype=torch.float64)
    assert 0.3 < diffs.std().item() < 2.0 and (diffs != 0).all() and stats["flipped"] == 0


@pytest.mark.parametrize(("noise_std", "flip_fraction", "seed"), [(0.0, 0.25, 0), (1.0, 0.0, 3), (0.5, 0.5, 11)])
def test_same_numbers_as_before_the_move_bit_for_bit(noise_std, flip_fraction, seed):
    got, _ = perturb_margins(MARGINS, noise_std=noise_std, flip_fraction=flip_fraction, seed=seed)
    want = old_formula(MARGINS, noise_std, flip_fraction, seed)
    assert torch.equal(got, want)
    # a float32 tensor of margins (as scored) gives what its float64 values give
    m32 = torch.tensor(MARGINS, dtype=torch.float32) / 3
    got32, _ = perturb_margins(m32, noise_std=noise_std, flip_fraction=flip_fraction, seed=seed)
    assert torch.equal(got32, old_formula(m32.double().tolist(), noise_std, flip_fraction, seed))


def test_bad_levels_are_refused():
    with pytest.raises(ValueError, match="noise_std"):
        perturb_margins(MARGINS, noise_std=-1.0, flip_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="flip_fraction"):
        perturb_margins(MARGINS, noise_std=0.0, flip_fraction=1.5, seed=0)


def test_perturbed_margins_reach_the_datamodule_unchanged_and_train_only():
    """The pipeline hands the DataModule text pairs with the perturbed rm_margin column: the training rows keep those
    float64 values exactly, the validation rows keep the clean ones; the DataModule has no perturbation knob."""
    pairs = datasets.Dataset.from_json(str(DATA / "pairs_train.jsonl")).select(range(12))
    perturbed, _ = perturb_margins(MARGINS, noise_std=0.7, flip_fraction=0.25, seed=5)
    train = _with_rm_margin(pairs, list(range(12)), perturbed.tolist())
    val = _with_rm_margin(pairs, list(range(12)), MARGINS)
    dm = PreferenceDataModule.from_datasets(train, val, **SMALL)
    dm.setup("fit")
    assert dm.train_dataset["rm_margin"] == perturbed.tolist()
    assert dm.val_dataset["rm_margin"] == MARGINS
    with pytest.raises(TypeError, match="margin_flip_fraction"):
        PreferenceDataModule.from_datasets(pairs, margin_flip_fraction=0.25, **SMALL)


def test_rows_tokenization_dropped_get_a_placeholder_in_place():
    rows = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "chosen": ["x"] * 3, "rejected": ["y"] * 3})
    assert _with_rm_margin(rows, [0, 2], [1.5, -2.0])["rm_margin"] == [1.5, 0.0, -2.0]
