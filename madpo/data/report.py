"""The data report: what `PreferenceDataModule.setup` counted, printed by default (one line per split).

Rows dropped and prompts or completions cut change what the model trains on, so they are printed, not only logged at
INFO: a 5,000-word prompt cut to `max_prompt_length` should not pass without a word. When truncation touches a large
share of a split (`WARN_FRACTION`), a warning says which limit to raise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

WARN_FRACTION = 0.1  # warn when at least this share of a split's prompts (or completions) is cut
PREFIX = "[madpo]"

# why rows were dropped: validation reasons (madpo.data.formats) and tokenization filters (madpo.data.tokenize)
REASONS = {
    "not_a_string": "missing or not a string",
    "empty_completion": "empty completion",
    "chosen_equals_rejected": "chosen equals rejected",
    "bad_rm_margin": "bad rm_margin",
    "bad_weight": "bad weight",
    "bad_margin": "bad margin",
    "bad_messages": "malformed messages",
    "filtered_prompt_too_long": "prompt leaves no room for a completion",
    "filtered_empty_prompt": "empty prompt",
}


def _n(value: int) -> str:
    return f"{value:,}"


def _count(value: int, noun: str) -> str:
    return f"{value:,} {noun}" if value == 1 else f"{value:,} {noun}s"


def _sources(sources: list[str]) -> str:
    return sources[0] if len(sources) == 1 else f"{len(sources)} files"


def _completion_fields(split: Mapping[str, Any]) -> int:
    fmt = str(split.get("format", ""))
    return 0 if fmt.startswith("prompt") else 1 if fmt.startswith("sft") else 2  # prompt-only rows: generation


def _drops(split: Mapping[str, Any]) -> dict[str, int]:
    tok = split.get("tokenize") or {}
    drops = {REASONS.get(k, k): v for k, v in (split.get("rows_dropped") or {}).items() if v}
    for key in ("filtered_prompt_too_long", "filtered_empty_prompt"):
        if tok.get(key):
            drops[REASONS[key]] = drops.get(REASONS[key], 0) + tok[key]
    return drops


def format_split_report(name: str, split: Mapping[str, Any], *, max_length: int, max_prompt_length: int) -> str:
    """One line for one split's stats (a `PreferenceDataModule.stats` entry); keys it lacks are left out."""
    tok = split.get("tokenize") or {}
    loaded = split.get("rows_loaded", tok.get("rows_in", 0))
    rows = split.get("rows", tok.get("rows_out"))
    head = (
        f"{_n(rows)} of {_count(loaded, 'row')} used" if rows is not None and rows != loaded else _count(loaded, "row")
    )
    described = ", ".join(p for p in (split.get("format"), _sources(split.get("sources") or [])) if p)
    parts = [f"{name}: {head}" + (f" ({described})" if described else "")]
    if split.get("implicit_prompts"):
        parts.append(f"prompt split off chosen/rejected in {_count(split['implicit_prompts'], 'row')}")
    drops = _drops(split)
    dropped = sum(drops.values())
    parts.append(
        f"{_n(dropped)} dropped" + (f" ({', '.join(f'{k}: {_n(v)}' for k, v in drops.items())})" if dropped else "")
    )
    if tok:
        prompts = tok.get("prompts_truncated", 0)
        text = f"{_count(prompts, 'prompt')} truncated to {_n(max_prompt_length)} tokens"
        if prompts and tok.get("longest_prompt"):
            text += f" (longest {_n(tok['longest_prompt'])})"
        parts.append(text)
        completions = tok.get("chosen_truncated", 0) + tok.get("rejected_truncated", 0)
        text = f"{_count(completions, 'completion')} truncated to fit max_length {_n(max_length)}"
        if completions and tok.get("longest_completion"):
            text += f" (longest {_n(tok['longest_completion'])})"
        if _completion_fields(split):
            parts.append(text)
    return f"{PREFIX} " + "; ".join(parts)


def format_data_report(stats: Mapping[str, Mapping[str, Any]], *, max_length: int, max_prompt_length: int) -> str:
    """The report of every split in `stats` (`PreferenceDataModule.stats`), one line each."""
    return "\n".join(
        format_split_report(name, split, max_length=max_length, max_prompt_length=max_prompt_length)
        for name, split in stats.items()
        if isinstance(split, Mapping)
    )


def truncation_warnings(
    stats: Mapping[str, Mapping[str, Any]],
    *,
    max_length: int,
    max_prompt_length: int,
    fraction: float = WARN_FRACTION,
) -> list[str]:
    """A warning per split where at least `fraction` of the prompts, or of the completions, were cut."""
    out = []
    for name, split in stats.items():
        tok = split.get("tokenize") if isinstance(split, Mapping) else None
        if not tok or not tok.get("rows_in"):
            continue
        rows = tok["rows_in"]
        prompts = tok.get("prompts_truncated", 0)
        completions = tok.get("chosen_truncated", 0) + tok.get("rejected_truncated", 0)
        shares = (prompts / rows, completions / max(rows * _completion_fields(split), 1))
        cuts, flags = [], []
        if prompts and shares[0] >= fraction:  # a cut prompt keeps its end
            cuts.append(f"{shares[0]:.0%} of the prompts (to max_prompt_length={max_prompt_length})")
            flags.append("--data.max_prompt_length")
        if completions and shares[1] >= fraction:  # a cut completion loses its end and EOS
            cuts.append(f"{shares[1]:.0%} of the completions (to fit max_length={max_length})")
            flags.append("--data.max_length")
        if cuts:
            out.append(
                f"{PREFIX} warning: {name}: truncation cut {' and '.join(cuts)}; raise {' / '.join(flags)} "
                "if that is not intended"
            )
    return out


def print_data_report(stats: Mapping[str, Mapping[str, Any]], *, max_length: int, max_prompt_length: int) -> None:
    """Print the report on stdout and log the truncation warnings (call it on rank 0 only)."""
    report = format_data_report(stats, max_length=max_length, max_prompt_length=max_prompt_length)
    if report:
        print(report, flush=True)
    for warning in truncation_warnings(stats, max_length=max_length, max_prompt_length=max_prompt_length):
        log.warning(warning)
