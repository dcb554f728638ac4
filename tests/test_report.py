"""madpo.data.report: the data report printed at the end of `PreferenceDataModule.setup`."""

from __future__ import annotations

import logging

from madpo.data.report import format_data_report, print_data_report, truncation_warnings


def tokenize(**counts: int) -> dict[str, int]:
    base = {
        "rows_in": 1000,
        "rows_out": 1000,
        "prompts_truncated": 0,
        "chosen_truncated": 0,
        "rejected_truncated": 0,
        "filtered_prompt_too_long": 0,
        "filtered_empty_prompt": 0,
        "longest_prompt": 100,
        "longest_completion": 50,
    }
    return {**base, **counts}


def split(**kw) -> dict:  # noqa: ANN003
    base = {"sources": ["data/train.jsonl"], "format": "preference", "rows_loaded": 1000, "rows_dropped": {}}
    return {**base, **kw}


LIMITS = {"max_length": 512, "max_prompt_length": 256}


def test_clean_split_is_one_line():
    stats = {"train": split(tokenize=tokenize(), rows=1000)}
    assert format_data_report(stats, **LIMITS) == (
        "[madpo] train: 1,000 rows (preference, data/train.jsonl); 0 dropped; 0 prompts truncated to 256 tokens; "
        "0 completions truncated to fit max_length 512"
    )
    assert truncation_warnings(stats, **LIMITS) == []


def test_drops_truncation_and_implicit_prompts_are_counted():
    stats = {
        "train": split(
            rows_dropped={"not_a_string": 3},
            implicit_prompts=1000,
            tokenize=tokenize(
                rows_in=997,
                rows_out=995,
                prompts_truncated=12,
                chosen_truncated=1,
                longest_prompt=5120,
                longest_completion=700,
                filtered_prompt_too_long=2,
            ),
            rows=995,
        ),
        "val": split(
            sources=["a.jsonl", "b.jsonl"], format="sft", rows_loaded=1, tokenize=tokenize(rows_in=1, rows_out=1)
        ),
    }
    train, val = format_data_report(stats, **LIMITS).splitlines()
    assert train == (
        "[madpo] train: 995 of 1,000 rows used (preference, data/train.jsonl); prompt split off chosen/rejected in "
        "1,000 rows; 5 dropped (missing or not a string: 3, prompt leaves no room for a completion: 2); "
        "12 prompts truncated to 256 tokens (longest 5,120); 1 completion truncated to fit max_length 512 "
        "(longest 700)"
    )
    assert val.startswith("[madpo] val: 1 row (sft, 2 files); 0 dropped")


def test_warns_when_truncation_touches_a_large_share():
    stats = {
        "train": split(tokenize=tokenize(prompts_truncated=450, chosen_truncated=99, rejected_truncated=99)),
        "val": split(tokenize=tokenize(prompts_truncated=99, chosen_truncated=150, rejected_truncated=50)),
    }
    train, val = truncation_warnings(stats, **LIMITS)
    assert train == (
        "[madpo] warning: train: truncation cut 45% of the prompts (to max_prompt_length=256); raise "
        "--data.max_prompt_length if that is not intended"
    )
    assert val == (
        "[madpo] warning: val: truncation cut 10% of the completions (to fit max_length=512); raise "
        "--data.max_length if that is not intended"
    )
    assert truncation_warnings({"train": split(tokenize=tokenize(prompts_truncated=1))}, **LIMITS) == []


def test_print_data_report_prints_and_warns(capsys, caplog):
    stats = {"train": split(tokenize=tokenize(prompts_truncated=500), rows=1000)}
    with caplog.at_level(logging.WARNING, logger="madpo.data.report"):
        print_data_report(stats, **LIMITS)
    assert capsys.readouterr().out.startswith("[madpo] train: 1,000 rows")
    assert "50% of the prompts" in caplog.text
