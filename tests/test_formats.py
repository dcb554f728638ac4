"""madpo.data.formats: loading local files / hub / in-memory rows, format detection, validation errors, drop mode."""

import json
import logging
from pathlib import Path

import datasets
import pytest

from madpo.data.formats import (
    PREFERENCE,
    SFT,
    InvalidRowError,
    detect_format,
    load_files,
    load_hub,
    load_in_memory,
)

DATA = Path(__file__).parent / "data"
PAIR = {"prompt": "The film", "chosen": " was great.", "rejected": " was awful."}


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_load_preference_file(hf_cache):
    raw = load_files(str(DATA / "pairs_train.jsonl"), cache_dir=hf_cache)
    assert raw.format == PREFERENCE and not raw.conversational
    assert raw.rows_in == raw.rows_out == 256 and raw.dropped == {}
    assert raw.dataset["index"][:3] == [0, 1, 2]
    first = json.loads((DATA / "pairs_train.jsonl").read_text().splitlines()[0])
    assert {k: raw.dataset[0][k] for k in first} == first


def test_load_sft_file(hf_cache):
    raw = load_files(str(DATA / "sft_val.jsonl"), cache_dir=hf_cache)
    assert raw.format == SFT and raw.rows_out == 32


def test_several_files_are_concatenated_with_a_global_index(hf_cache):
    raw = load_files([str(DATA / "pairs_val.jsonl"), str(DATA / "pairs_train.jsonl")], cache_dir=hf_cache)
    assert raw.rows_out == 64 + 256
    assert raw.dataset["index"] == list(range(320))
    assert raw.sources == [str(DATA / "pairs_val.jsonl"), str(DATA / "pairs_train.jsonl")]


def test_parquet_csv_and_glob(tmp_path, hf_cache):
    ds = datasets.Dataset.from_list([PAIR, {**PAIR, "rejected": " was dull."}])
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "b.csv"), index=False)
    assert load_files(str(tmp_path / "a.parquet"), cache_dir=hf_cache).rows_out == 2
    assert load_files(str(tmp_path / "b.csv"), cache_dir=hf_cache).dataset[1]["rejected"] == " was dull."
    assert load_files(str(tmp_path / "*.*"), cache_dir=hf_cache).rows_out == 4


def test_mixed_formats_in_one_split_raise(tmp_path, hf_cache):
    with pytest.raises(ValueError, match="share one row format"):
        load_files([str(DATA / "pairs_val.jsonl"), str(DATA / "sft_val.jsonl")], cache_dir=hf_cache)


def test_bad_paths(tmp_path, hf_cache):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_files(str(tmp_path / "nope.jsonl"), cache_dir=hf_cache)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"x\.txt: unsupported file type"):
        load_files(str(tmp_path / "x.txt"), cache_dir=hf_cache)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: could not be read as json"):
        load_files(str(tmp_path / "broken.json"), cache_dir=hf_cache)


def test_missing_column_lists_found_and_expected(tmp_path, hf_cache):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError) as e:
        load_files(path, cache_dir=hf_cache)
    msg = str(e.value)
    assert path in msg and "missing column(s) ['rejected']" in msg
    assert "found columns ['chosen', 'prompt']" in msg and "expected ['prompt', 'chosen', 'rejected']" in msg
    with pytest.raises(ValueError, match=r"<in-memory>: cannot tell the row format: found columns \['text'\]"):
        load_in_memory(datasets.Dataset.from_list([{"text": "x"}]))
    with pytest.raises(ValueError, match="implicit prompt"):
        detect_format(["chosen", "rejected"], "src")


@pytest.mark.parametrize(
    ("bad", "field", "what"),
    [
        ({"chosen": None}, "chosen", "is None"),
        ({"prompt": 5}, "prompt", "is not a string"),
        ({"rejected": "  \n "}, "rejected", "is empty"),
        ({"rejected": PAIR["chosen"]}, "rejected", "identical to 'chosen'"),
        ({"rm_margin": "x"}, "rm_margin", "is not a number"),
        ({"rm_margin": float("nan")}, "rm_margin", "is not finite"),
        ({"rm_margin": None}, "rm_margin", "is not a number"),
    ],
)
def test_invalid_row_names_file_row_and_field(tmp_path, hf_cache, bad, field, what):
    rows = [{**PAIR, "rm_margin": 1.0} for _ in range(4)]
    rows = [{**r, "rejected": f" was awful {i}."} for i, r in enumerate(rows)]
    rows[2] = {**rows[2], **bad}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidRowError) as e:
        load_files(path, cache_dir=hf_cache)
    msg = str(e.value)
    assert msg.startswith(f"{path}: row 2: field {field!r} ") and what in msg


def test_sft_empty_completion_and_second_file_row_numbers(tmp_path, hf_cache):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": " b"}] * 3)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": ""}])
    with pytest.raises(InvalidRowError, match=r"bad\.jsonl: row 1: field 'completion' is empty"):
        load_files([good, bad], cache_dir=hf_cache)


def test_drop_mode_counts_logs_and_keeps_source_index(tmp_path, hf_cache, caplog):
    rows = [{**PAIR, "rejected": f" no {i}"} for i in range(8)]
    rows[1]["chosen"] = None
    rows[3]["prompt"] = 7
    rows[4]["rejected"] = rows[4]["chosen"]
    rows[6]["chosen"] = " "
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        raw = load_files(path, invalid_rows="drop", cache_dir=hf_cache)
    assert raw.dropped == {"not_a_string": 2, "chosen_equals_rejected": 1, "empty_completion": 1}
    assert raw.rows_in == 8 and raw.rows_out == 4
    assert raw.dataset["index"] == [0, 2, 5, 7]
    assert raw.dataset.features["prompt"] == datasets.Value("string")  # the mixed-type column is rebuilt as text
    assert raw.dataset["prompt"] == [PAIR["prompt"]] * 4
    assert "dropped 4 of 8 rows" in caplog.text and f"{path}: row 1: field 'chosen'" in caplog.text


def test_invalid_rows_policy_is_checked():
    with pytest.raises(ValueError, match="invalid_rows"):
        load_in_memory(datasets.Dataset.from_list([PAIR]), invalid_rows="ignore")


def test_in_memory_source_name_and_type():
    ds = datasets.Dataset.from_list([PAIR, {**PAIR, "chosen": None}])
    with pytest.raises(InvalidRowError, match=r"^<in-memory>: row 1: field 'chosen' is None"):
        load_in_memory(ds)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        load_in_memory(datasets.DatasetDict({"train": ds}))


def test_hub_path_uses_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split))
        return datasets.Dataset.from_list([PAIR, {**PAIR, "rejected": None}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(InvalidRowError, match=r"^org/prefs\[test\]: row 1: field 'rejected' is None"):
        load_hub("org/prefs", "test")
    raw = load_hub("org/prefs", "train", invalid_rows="drop")
    assert calls == [("org/prefs", "test"), ("org/prefs", "train")]
    assert raw.rows_out == 1 and raw.sources == ["org/prefs[train]"]


def test_conversational_rows():
    def msg(role, text):
        return [{"role": role, "content": text}]

    row = {"prompt": msg("user", "Hi?"), "chosen": msg("assistant", "Hello!"), "rejected": msg("assistant", "Go.")}
    raw = load_in_memory(datasets.Dataset.from_list([row, row]))
    assert raw.format == PREFERENCE and raw.conversational
    bad = {**row, "chosen": msg("assistant", "   ")}
    with pytest.raises(InvalidRowError, match="row 1: field 'chosen' has empty content"):
        load_in_memory(datasets.Dataset.from_list([row, bad]))
    bad = {**row, "rejected": "plain text"}
    with pytest.raises(InvalidRowError, match="row 0: field 'rejected' is not a non-empty list"):
        load_in_memory(datasets.Dataset.from_list([bad], features=None), source="conv")


def test_implicit_prompt_is_split_off_at_a_word_boundary():
    from madpo.data.formats import load_in_memory

    rows = [
        {"chosen": "The film was great fun.", "rejected": "The film was a bore."},
        {"chosen": "I loved it", "rejected": "I hated it"},
    ]
    raw = load_in_memory(datasets.Dataset.from_list(rows))
    got = raw.dataset.with_format(None).to_list()
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in got] == [
        ("The film was", " great fun.", " a bore."),
        ("I", " loved it", " hated it"),
    ]
    for r, original in zip(got, rows, strict=True):  # nothing lost: prompt + completion is the original text
        assert r["prompt"] + r["chosen"] == original["chosen"] and r["prompt"] + r["rejected"] == original["rejected"]


def test_implicit_prompt_conversational_splits_shared_messages():
    from madpo.data.formats import load_in_memory

    user = {"role": "user", "content": "Review this film."}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "Great."}],
            "rejected": [user, {"role": "assistant", "content": "Dull."}],
        }
    ]
    raw = load_in_memory(datasets.Dataset.from_list(rows))
    row = raw.dataset.with_format(None).to_list()[0]
    assert raw.conversational and row["prompt"] == [user]
    assert row["chosen"] == [{"role": "assistant", "content": "Great."}]
