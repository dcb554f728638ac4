"""madpo.data.tokenize: boundary rule, BOS/EOS exactly once, truncation policy and its counts, cache fingerprint."""

import copy
import logging
from pathlib import Path

import datasets
import pytest

import madpo.data.tokenize as tokenize_module
from madpo.data.formats import load_files, load_in_memory
from madpo.data.tokenize import tokenize_dataset, tokenize_fingerprint
from madpo.modeling import load_tokenizer

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny-llama")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def rows(n=6):
    return [
        {"prompt": f"Movie number {i} was", "chosen": " good" * (i + 1), "rejected": " bad and boring" * (i + 1)}
        for i in range(n)
    ]


def run(tok, data, **kw):
    kw.setdefault("max_length", 512)
    kw.setdefault("max_prompt_length", 256)
    return tokenize_dataset(load_in_memory(datasets.Dataset.from_list(data)), tok, **kw)


def test_columns_and_boundary_rule(tok):
    data = rows()
    ds, stats = run(tok, data)
    assert ds.column_names == ["index", "prompt_ids", "chosen_ids", "rejected_ids"]
    for row, out in zip(data, ds, strict=True):
        # prompt and completion tokenized separately, BOS first, EOS last
        assert out["prompt_ids"] == [tok.bos_token_id] + ids(tok, row["prompt"])
        assert out["chosen_ids"] == ids(tok, row["chosen"]) + [tok.eos_token_id]
        assert out["rejected_ids"] == ids(tok, row["rejected"]) + [tok.eos_token_id]
    assert stats.rows_in == stats.rows_out == 6 and stats.prompts_truncated == stats.chosen_truncated == 0


def test_bos_and_eos_exactly_once(tok):
    data = [{"prompt": "<|bos|>Already has BOS", "chosen": " ends with EOS<|eos|>", "rejected": " no EOS"}]
    out = run(tok, data)[0][0]
    assert out["prompt_ids"][0] == tok.bos_token_id and out["prompt_ids"].count(tok.bos_token_id) == 1
    assert out["chosen_ids"][-1] == tok.eos_token_id and out["chosen_ids"].count(tok.eos_token_id) == 1
    assert out["rejected_ids"][-1] == tok.eos_token_id and out["rejected_ids"].count(tok.eos_token_id) == 1
    assert tok.decode(out["prompt_ids"] + out["chosen_ids"]) == "<|bos|>Already has BOS ends with EOS<|eos|>"


def test_prompt_truncation_keeps_bos_and_end(tok):
    data = rows()
    full = [[tok.bos_token_id] + ids(tok, r["prompt"]) for r in data]
    limit = 4
    ds, stats = run(tok, data, max_prompt_length=limit)
    for f, out in zip(full, ds, strict=True):
        assert out["prompt_ids"] == ([f[0]] + f[-(limit - 1) :] if len(f) > limit else f)
    assert stats.prompts_truncated == sum(len(f) > limit for f in full) > 0


def test_completion_truncation_keeps_start_and_counts(tok):
    data = rows()
    max_length = 12
    ds, stats = run(tok, data, max_length=max_length, max_prompt_length=6)
    n_chosen = n_rejected = 0
    for row, out in zip(data, ds, strict=True):
        budget = max_length - len(out["prompt_ids"])
        chosen = ids(tok, row["chosen"]) + [tok.eos_token_id]
        rejected = ids(tok, row["rejected"]) + [tok.eos_token_id]
        assert out["chosen_ids"] == chosen[:budget] and out["rejected_ids"] == rejected[:budget]
        assert len(out["prompt_ids"]) + len(out["rejected_ids"]) <= max_length
        n_chosen += len(chosen) > budget
        n_rejected += len(rejected) > budget
    assert (stats.chosen_truncated, stats.rejected_truncated) == (n_chosen, n_rejected)
    assert 0 < n_chosen < n_rejected  # rejected texts are longer


def test_rows_whose_prompt_fills_max_length_are_filtered(tok, caplog):
    data = rows(4)
    data[2]["prompt"] = "a much longer prompt " * 10
    prompt_len = 1 + len(ids(tok, data[2]["prompt"]))
    with caplog.at_level(logging.INFO):
        ds, stats = run(tok, data, max_length=prompt_len, max_prompt_length=None)
    assert stats.filtered_prompt_too_long == 1 and stats.rows_out == 3
    assert ds["index"] == [0, 1, 3]
    assert "1 filtered" in caplog.text and any(r.levelno == logging.WARNING for r in caplog.records)
    # one token more leaves room for exactly one completion token
    ds, stats = run(tok, data, max_length=prompt_len + 1, max_prompt_length=None)
    assert stats.filtered_prompt_too_long == 0 and len(ds[2]["chosen_ids"]) == 1


def test_empty_prompt_without_bos_is_filtered(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    data = rows(3)
    data[1]["prompt"] = ""
    ds, stats = run(no_bos, data)
    assert stats.filtered_empty_prompt == 1 and ds["index"] == [0, 2]
    assert ds[0]["prompt_ids"] == ids(tok, data[0]["prompt"])  # no BOS to add


def test_sft_rows_and_rm_margin_carried(tok):
    ds, stats = run(tok, [{"prompt": "A", "completion": " b c", "extra": 1}] * 2)
    assert ds.column_names == ["index", "prompt_ids", "chosen_ids"]
    assert ds[0]["chosen_ids"] == ids(tok, " b c") + [tok.eos_token_id]
    data = [{**r, "rm_margin": float(i) - 0.5} for i, r in enumerate(rows(3))]
    ds, _ = run(tok, data)
    assert ds.column_names == ["index", "prompt_ids", "chosen_ids", "rejected_ids", "rm_margin"]
    assert ds["rm_margin"] == [-0.5, 0.5, 1.5]


def test_bad_lengths(tok):
    with pytest.raises(ValueError, match="max_length"):
        run(tok, rows(1), max_length=1)
    with pytest.raises(ValueError, match="max_prompt_length"):
        run(tok, rows(1), max_prompt_length=0)


def test_datasets_cache_is_reused_and_invalidated(tok, tmp_path, monkeypatch):
    raw = load_files(str(DATA / "pairs_val.jsonl"), cache_dir=str(tmp_path))
    calls = []
    real = tokenize_module._tokenize_batch
    monkeypatch.setattr(tokenize_module, "_tokenize_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    first, _ = tokenize_dataset(raw, tok, max_length=64, max_prompt_length=16)
    n_calls = len(calls)
    assert n_calls > 0 and first.cache_files
    again_raw = load_files(str(DATA / "pairs_val.jsonl"), cache_dir=str(tmp_path))  # as another process would
    second, stats = tokenize_dataset(again_raw, tok, max_length=64, max_prompt_length=16)
    assert len(calls) == n_calls  # cache hit: the tokenizer did not run
    assert second._fingerprint == first._fingerprint and second[:] == first[:]
    assert stats.rows_out == 64
    # any change of the inputs gives another fingerprint
    fp = tokenize_fingerprint(raw.dataset, tok, max_length=64, max_prompt_length=16, conversational=False)
    other_tok = copy.deepcopy(tok)
    other_tok.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    assert fp != tokenize_fingerprint(raw.dataset, tok, max_length=65, max_prompt_length=16, conversational=False)
    assert fp != tokenize_fingerprint(raw.dataset, tok, max_length=64, max_prompt_length=17, conversational=False)
    assert fp != tokenize_fingerprint(raw.dataset, other_tok, max_length=64, max_prompt_length=16, conversational=False)
    sft = load_files(str(DATA / "sft_val.jsonl"), cache_dir=str(tmp_path))
    assert fp != tokenize_fingerprint(sft.dataset, tok, max_length=64, max_prompt_length=16, conversational=False)
    tokenize_dataset(raw, tok, max_length=65, max_prompt_length=16)
    assert len(calls) > n_calls


TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}"
)


def conversation(answer):
    return [{"role": "assistant", "content": answer}]


def test_conversational_rows_use_the_chat_template(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = TEMPLATE
    row = {
        "prompt": [{"role": "user", "content": "Best film?"}],
        "chosen": conversation("Heat."),
        "rejected": conversation("None."),
    }
    out = run(chat, [row])[0][0]
    assert chat.decode(out["prompt_ids"]) == "<|bos|>user: Best film?<|eos|><|bos|>assistant:"
    assert out["prompt_ids"].count(tok.bos_token_id) == 2  # the template's own BOS tokens, none added
    assert chat.decode(out["chosen_ids"]) == " Heat.<|eos|>"  # the template ends the turn; no second EOS
    assert out["rejected_ids"].count(tok.eos_token_id) == 1
    with pytest.raises(ValueError, match="chat template"):
        run(tok, [row])
    chat.chat_template = TEMPLATE.replace("<|bos|>assistant:{% endif %}", "ASSISTANT>{% endif %}")
    with pytest.raises(ValueError, match="row 0: the chat template does not render the prompt as a prefix"):
        run(chat, [row])
