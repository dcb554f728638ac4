"""madpo.data.datamodule: sources, val split, the module handshake (pairs, rm_margin, reference log-probs), caching."""

import contextlib
import copy
import logging
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

import madpo.data.datamodule as dm_module
import madpo.data.sources as sources
import madpo.scoring as scoring
from madpo.data import DataRequirements, PreferenceDataModule
from madpo.data.collate import PreferenceCollator
from madpo.modeling import init_reward_model, load_causal_lm, load_reward_model, load_tokenizer
from madpo.scoring import score_margins, score_reference_logps

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny-llama")
PAIRS = str(DATA / "pairs_train.jsonl")
SMALL = {"tokenizer": TINY, "max_length": 48, "max_prompt_length": 12, "batch_size": 4}


@pytest.fixture(autouse=True)
def isolated_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def pairs():
    return datasets.Dataset.from_json(PAIRS).select(range(12))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory, tok):
    """Same vocabulary plus one special token: tokenizes the test data identically, but is another tokenizer."""
    other = copy.deepcopy(tok)
    other.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    path = tmp_path_factory.mktemp("other_tok")
    other.save_pretrained(path)
    return str(path)


def make_rm(path, tok, seed, tokenizer=None):
    torch.manual_seed(seed)
    init_reward_model(TINY, pad_token_id=tok.pad_token_id).save_pretrained(path)
    (tokenizer or tok).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory, tok, other_tokenizer_dir):
    root = tmp_path_factory.mktemp("rms")
    return {
        "a": make_rm(root / "a", tok, 0),
        "b": make_rm(root / "b", tok, 1),
        "other_tok": make_rm(root / "c", tok, 0, load_tokenizer(other_tokenizer_dir)),
    }


class FakeModule:
    """Stand-in for a LightningModule: the two handshake methods only."""

    def __init__(self, req: DataRequirements, model_seed: int | None = None):
        self.req, self.model_seed, self.entered = req, model_seed, 0

    def data_requirements(self):
        return self.req

    @contextlib.contextmanager
    def reference_model(self):
        self.entered += 1
        model = load_causal_lm(TINY).eval()
        if self.model_seed is not None:  # other weights
            torch.manual_seed(self.model_seed)
            with torch.no_grad():
                model.lm_head.weight.add_(0.01 * torch.randn_like(model.lm_head.weight))
        yield model


def attach(dm, module):
    contexts = []

    @contextlib.contextmanager
    def forward_context():
        contexts.append(1)
        yield

    dm.trainer = SimpleNamespace(
        lightning_module=module,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        precision_plugin=SimpleNamespace(forward_context=forward_context, precision="32-true"),
    )
    return contexts


def counting(monkeypatch, name, module=dm_module):
    """Count the calls of `module.name` (the name as the code under test looks it up)."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ----------------------------------------------------------------------------------------------------------------------


def test_from_datasets_and_dataloaders(pairs):
    dm = PreferenceDataModule.from_datasets(pairs, pairs.select(range(5)), eval_batch_size=5, **SMALL)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 48
    assert batch["completion_mask"].dtype == torch.bool and batch["index"].shape == (4,)
    val = next(iter(dm.val_dataloader()))
    assert val["index"].tolist() == [0, 1, 2, 3, 4]
    assert dm.stats["train"]["tokenize"]["rows_out"] == 12 and dm.stats["val"]["rows"] == 5
    assert dm.hparams.max_length == 48 and dm.requirements == DataRequirements(pairs=False)
    with pytest.raises(ValueError, match="do not also pass train_files"):
        PreferenceDataModule.from_datasets(pairs, train_files=PAIRS, **SMALL)


def test_train_shuffle_is_seeded(pairs):
    def first_indices(seed):
        dm = PreferenceDataModule.from_datasets(pairs, seed=seed, **SMALL)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["index"].tolist()

    assert first_indices(0) == first_indices(0)
    assert first_indices(0) != first_indices(1) or first_indices(0) != first_indices(2)


def test_files_setup_is_idempotent(monkeypatch):
    loads = counting(monkeypatch, "load_files", sources)
    dm = PreferenceDataModule(train_files=PAIRS, val_files=str(DATA / "pairs_val.jsonl"), **SMALL)
    dm.setup("fit")
    train = dm.train_dataset
    dm.setup("validate")
    assert len(loads) == 2 and dm.train_dataset is train
    assert len(dm.train_dataset) == 256 and len(dm.val_dataset) == 64


def test_val_fraction_split_is_seeded():
    def split(seed):
        dm = PreferenceDataModule(train_files=PAIRS, val_fraction=0.25, seed=seed, **SMALL)
        dm.setup("fit")
        return sorted(dm.train_dataset["index"]), sorted(dm.val_dataset["index"])

    train0, val0 = split(0)
    assert split(0) == (train0, val0)
    assert split(1)[1] != val0
    assert len(val0) == 64 and sorted(train0 + val0) == list(range(256))
    with pytest.raises(ValueError, match="cannot be combined"):
        PreferenceDataModule(train_files=PAIRS, val_files=PAIRS, val_fraction=0.1, **SMALL).setup("fit")


def test_argument_errors(pairs):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PreferenceDataModule(train_files=PAIRS).setup("fit")
    with pytest.raises(ValueError, match="no training data"):
        PreferenceDataModule(**SMALL).setup("fit")
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferenceDataModule(tokenizer=TINY, max_length=16, max_prompt_length=16)
    with pytest.raises(ValueError, match="val_fraction"):
        PreferenceDataModule(tokenizer=TINY, val_fraction=1.0)


def test_drop_mode_stats():
    bad = datasets.Dataset.from_list(
        [{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": " b", "rejected": " b"}]
    )
    with pytest.raises(ValueError, match="<in-memory>: row 1: field 'rejected'"):
        PreferenceDataModule.from_datasets(bad, **SMALL).setup("fit")
    dm = PreferenceDataModule.from_datasets(bad, invalid_rows="drop", **SMALL)
    dm.setup("fit")
    assert dm.stats["train"]["rows_dropped"] == {"chosen_equals_rejected": 1} and len(dm.train_dataset) == 1
    with pytest.raises(ValueError, match="no training rows left"):
        PreferenceDataModule.from_datasets(bad.select([1]), invalid_rows="drop", **SMALL).setup("fit")


def test_sft_data_and_pairs_requirement(monkeypatch):
    sft = str(DATA / "sft_val.jsonl")
    tokenized = counting(monkeypatch, "tokenize_dataset")
    refusing = PreferenceDataModule(train_files=sft, **SMALL)
    attach(refusing, FakeModule(DataRequirements(pairs=True)))
    with pytest.raises(ValueError, match="needs preference pairs .*sft_val.jsonl.* SFT format"):
        refusing.setup("fit")
    assert tokenized == []  # refused before any tokenization
    dm = PreferenceDataModule(train_files=sft, **SMALL)
    attach(dm, FakeModule(DataRequirements(pairs=False)))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and dm.format == "sft"


def test_rm_margin_requirement(pairs):
    dm = PreferenceDataModule.from_datasets(pairs, **SMALL)
    attach(dm, FakeModule(DataRequirements(rm_margin=True)))
    with pytest.raises(ValueError, match="--data.reward_model .* or provide an 'rm_margin' column"):
        dm.setup("fit")
    with_margin = pairs.add_column("rm_margin", [float(i) for i in range(12)])
    dm = PreferenceDataModule.from_datasets(with_margin, **SMALL)
    attach(dm, FakeModule(DataRequirements(rm_margin=True)))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["rm_margin"].dtype == torch.float32
    assert batch["rm_margin"].tolist() == [float(i) for i in batch["index"].tolist()]


def test_reward_model_margins_are_scored_and_cached(pairs, rm_dirs, tmp_path, monkeypatch, caplog):
    calls = counting(monkeypatch, "score_margins", scoring)
    with_margin = pairs.add_column("rm_margin", [0.0] * 12)

    def setup(**kw):
        args = {**SMALL, "reward_model": rm_dirs["a"], "cache_dir": str(tmp_path / "cache"), **kw}
        dm = PreferenceDataModule.from_datasets(with_margin, pairs.select(range(4)), **args)
        attach(dm, FakeModule(DataRequirements(rm_margin=True)))
        dm.setup("fit")
        return dm

    with caplog.at_level(logging.WARNING):
        dm = setup()
    assert "replace it" in caplog.text
    assert len(calls) == 2 and dm.stats["train"]["rm_margin"]["cache"] == "miss"
    rm = load_reward_model(rm_dirs["a"])
    want = score_margins(rm, dm.train_dataset, dm.collator, batch_size=5, progress=False)
    torch.testing.assert_close(torch.tensor(dm.train_dataset["rm_margin"], dtype=torch.float32), want)
    assert "rm_margin" in next(iter(dm.val_dataloader()))

    again = setup()  # cache hit: nothing scored
    assert len(calls) == 2 and again.stats["train"]["rm_margin"]["cache"] == "hit"
    assert again.train_dataset["rm_margin"] == dm.train_dataset["rm_margin"]
    setup(reward_model=rm_dirs["b"])  # other weights
    assert len(calls) == 4
    setup(max_length=40)  # other max_length
    assert len(calls) == 6


def test_reward_model_must_be_a_reward_model_and_one_with_its_own_tokenizer_scores_the_text(pairs, rm_dirs, tmp_path):
    dm = PreferenceDataModule.from_datasets(pairs, reward_model=TINY, **SMALL)
    with pytest.raises(ValueError, match="is a causal LM"):
        dm.setup("fit")
    # "other_tok": rm "a"'s weights with another tokenizer that tokenizes this data alike: scored from the text with
    # its own tokenizer (under its own budget, max_length - 1 prompt tokens), so the same margins as "a" where no
    # prompt is cut (tests/test_reward_backbone.py: a tokenizer with other ids)
    margins = {}
    for name in ("a", "other_tok"):
        dm = PreferenceDataModule.from_datasets(
            pairs, reward_model=rm_dirs[name], cache_dir=str(tmp_path / name), **{**SMALL, "max_prompt_length": 47}
        )
        dm.setup("fit")
        margins[name] = dm.train_dataset["rm_margin"]
    assert "own" in dm.stats["train"]["rm_margin"]["tokenizer"]
    assert margins["other_tok"] == pytest.approx(margins["a"], rel=1e-6)
    tok = load_tokenizer(TINY)  # asked to check the tokenizer (ids of `tok` to be scored): refused, naming both
    with pytest.raises(ValueError, match="tokenizer") as e, scoring.open_reward_model(rm_dirs["other_tok"], tok):
        pass
    assert rm_dirs["other_tok"] in str(e.value) and TINY in str(e.value)


def test_reference_logps_handshake_and_cache(pairs, tmp_path, other_tokenizer_dir, monkeypatch):
    calls = counting(monkeypatch, "score_reference_logps", scoring)

    def setup(module, **kw):
        args = {**SMALL, "cache_dir": str(tmp_path / "cache"), "scoring_batch_size": 5, **kw}
        dm = PreferenceDataModule.from_datasets(pairs, **args)
        contexts = attach(dm, module)
        dm.setup("fit")
        return dm, contexts

    module = FakeModule(DataRequirements(reference_logps=True))
    dm, contexts = setup(module)
    assert module.entered == 1 and len(calls) == 1 and len(contexts) == 3  # ceil(12 / 5) forwards in the context
    batch = next(iter(dm.train_dataloader()))
    assert batch["ref_chosen_logps"].dtype == torch.float32 and batch["ref_rejected_logps"].shape == (4,)
    ref = load_causal_lm(TINY).eval()
    chosen, rejected = score_reference_logps(ref, dm.train_dataset, PreferenceCollator(0), batch_size=3)
    torch.testing.assert_close(torch.tensor(dm.train_dataset["ref_chosen_logps"], dtype=torch.float32), chosen)
    torch.testing.assert_close(torch.tensor(dm.train_dataset["ref_rejected_logps"], dtype=torch.float32), rejected)

    dm2, _ = setup(FakeModule(DataRequirements(reference_logps=True)))
    assert len(calls) == 1 and dm2.stats["train"]["reference_logps"]["cache"] == "hit"
    setup(FakeModule(DataRequirements(reference_logps=True), model_seed=1))  # other weights
    assert len(calls) == 2
    dm3, _ = setup(FakeModule(DataRequirements(reference_logps=True)), tokenizer=other_tokenizer_dir)
    assert dm3.train_dataset["prompt_ids"] == dm.train_dataset["prompt_ids"]  # same tokens, other tokenizer
    assert len(calls) == 3
    setup(FakeModule(DataRequirements(reference_logps=True)), max_length=40)
    assert len(calls) == 4


def test_init_args_become_documented_cli_flags():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PreferenceDataModule, "data")
    help_text = parser.format_help()
    for flag, words in {
        "--data.train_files": "local training file",
        "--data.reward_model": "trained reward model",
        "--data.invalid_rows": "drop",
    }.items():
        assert flag in help_text
        assert words in help_text
    cfg = parser.parse_args(["--data.train_files", PAIRS, "--data.tokenizer", TINY, "--data.invalid_rows", "drop"])
    dm = PreferenceDataModule(**cfg.data.as_dict())
    assert dm.hparams.invalid_rows == "drop"
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.invalid_rows", "ignore"])


def test_hub_dataset_splits(pairs, monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split))
        return pairs if split == "train_prefs" else pairs.select(range(3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = PreferenceDataModule(dataset_name="org/prefs", train_split="train_prefs", val_split="test_prefs", **SMALL)
    dm.setup("fit")
    assert calls == [("org/prefs", "train_prefs"), ("org/prefs", "test_prefs")]
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (12, 3)
    assert dm.stats["val"]["sources"] == ["org/prefs[test_prefs]"]
