"""Load raw rows (local files, a hub dataset, or an in-memory `datasets.Dataset`) and validate them.

Two row formats are accepted, both with an explicit prompt (TRL's recommended layout):

- **preference**: `prompt`, `chosen`, `rejected` (optionally numeric columns: `rm_margin`, the reward model's margin;
  `weight` (>= 0), multiplying the pair's loss; `margin`, the reward model's target margin in its Bradley-Terry loss);
- **SFT**: `prompt`, `completion`.

Each may be *standard* (strings) or *conversational* (lists of `{"role", "content"}` messages; the tokenizer's chat
template turns them into text at tokenization time). Every error names the source (file path, `<in-memory>` or the
hub name), the 0-based row within that source and the field (a file that is not valid JSON: its 1-based line and
column); an empty file is refused. With `invalid_rows="drop"` offending rows are removed instead, counted per reason
and logged with `logging.warning`: never silently.

The validated dataset gets an `index` column: the row's number in the split as loaded (0-based, counted over all of
the split's files in order, before any row is dropped), so later errors and metrics can point back at the source row.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets

from madpo.data.jsoncheck import json_problem
from madpo.errors import UserError

log = logging.getLogger(__name__)

PREFERENCE = "preference"
SFT = "sft"
PROMPT = "prompt"  # prompt-only rows, for generation (`validate_prompts`)
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
SFT_COLUMNS = ("prompt", "completion")
COMPLETION_FIELDS = {PREFERENCE: ("chosen", "rejected"), SFT: ("completion",), PROMPT: ()}
IN_MEMORY = "<in-memory>"

InvalidRows = Literal["raise", "drop"]
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# drop-mode reasons (keys of RawData.dropped)
R_NOT_STRING = "not_a_string"
R_EMPTY = "empty_completion"
R_IDENTICAL = "chosen_equals_rejected"
R_MARGIN = "bad_rm_margin"
R_MESSAGES = "bad_messages"
R_WEIGHT = "bad_weight"
R_TARGET_MARGIN = "bad_margin"

NUMERIC_COLUMNS: dict[str, tuple[str, bool]] = {
    "rm_margin": (R_MARGIN, False),
    "weight": (R_WEIGHT, True),
    "margin": (R_TARGET_MARGIN, False),
}
"""Optional numeric columns: name -> (drop reason, must be >= 0). Each must be a finite number (not a bool)."""


@dataclass
class RawData:
    """Validated rows of one split.

    Attributes:
        dataset: the rows (original columns plus `index`).
        format: "preference" or "sft".
        conversational: True when the text fields are lists of chat messages.
        rows_in: rows read from the source(s), before dropping.
        dropped: rows removed per reason (only with `invalid_rows="drop"`).
        sources: the file paths / names the rows came from.
        implicit_prompts: rows whose prompt was split off the shared start of chosen/rejected.
    """

    dataset: datasets.Dataset
    format: str
    conversational: bool = False
    rows_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    implicit_prompts: int = 0

    @property
    def rows_out(self) -> int:
        return len(self.dataset)


class InvalidRowError(UserError):
    """A row that breaks the format; the message names the source, the row and the field."""


# ------------------------------------------------------------------------------------------------------------------
# Format detection
# ------------------------------------------------------------------------------------------------------------------


def detect_format(columns: list[str], source: str) -> str:
    """The row format of `columns`: preference (prompt/chosen/rejected) or SFT (prompt/completion).

    Otherwise a ValueError that lists the columns found and the ones expected.
    """
    cols = set(columns)
    if cols.issuperset(PREFERENCE_COLUMNS):
        return PREFERENCE
    if cols.issuperset(SFT_COLUMNS):
        return SFT
    if cols & {"chosen", "rejected"}:
        expected: tuple[str, ...] = PREFERENCE_COLUMNS
    elif "completion" in cols:
        expected = SFT_COLUMNS
    else:
        raise ValueError(
            f"{source}: cannot tell the row format: found columns {sorted(cols)}; expected either preference columns "
            f"{list(PREFERENCE_COLUMNS)} or SFT columns {list(SFT_COLUMNS)}"
        )
    missing = [c for c in expected if c not in cols]
    hint = (
        " (an implicit prompt, i.e. a prompt shared inside chosen/rejected, is not supported: split it into a "
        "'prompt' column)"
        if "prompt" in missing
        else ""
    )
    raise ValueError(
        f"{source}: missing column(s) {missing}; found columns {sorted(cols)}; expected {list(expected)}{hint}"
    )


def _shared_prefix(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen completion, rejected completion) of one implicit-prompt row.

    Strings: the longest common prefix, cut back to its last whitespace so both completions start at a word boundary
    (with their leading space). Message lists: the longest run of identical leading messages. Anything else is
    returned untouched, with an empty prompt, for validation to report.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        for a, b in zip(chosen, rejected, strict=False):
            if a != b:
                break
            n += 1
        if n < min(len(chosen), len(rejected)) or len(chosen) == len(rejected):
            cut = max(chosen.rfind(" ", 0, n + 1), 0) if n else 0
        else:  # one text is a prefix of the other: cut at the prefix's last word boundary
            cut = max(chosen.rfind(" ", 0, n), 0)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        for a, b in zip(chosen, rejected, strict=False):
            if a != b:
                break
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    return "", chosen, rejected


def split_implicit_prompt(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """TRL's implicit-prompt rows (`chosen`/`rejected` that both start with the prompt): split the shared prefix off
    into a `prompt` column. Rows with no shared prefix get an empty prompt (logged with a count)."""
    columns = dataset.select_columns(["chosen", "rejected"]).with_format(None).to_dict()
    split = [_shared_prefix(c, r) for c, r in zip(columns["chosen"], columns["rejected"], strict=True)]
    empty = sum(1 for p, _, _ in split if not p)
    log.info("%s: implicit prompt split off the shared prefix of chosen/rejected in %d rows", source, len(split))
    if empty:
        log.warning("%s: %d row(s) share no prefix between chosen and rejected: their prompt is empty", source, empty)
    rest = [c for c in dataset.column_names if c not in ("chosen", "rejected")]
    data = {name: dataset[name] for name in rest}
    data.update(prompt=[p for p, _, _ in split], chosen=[c for _, c, _ in split], rejected=[r for _, _, r in split])
    return datasets.Dataset.from_dict(data)


def _looks_conversational(columns: dict[str, list[Any]], fields: list[str]) -> bool:
    """True when the first non-None text value is a list of messages (the format of a column is decided once)."""
    for name in fields:
        if name in NUMERIC_COLUMNS:
            continue
        for value in columns[name]:
            if value is not None:
                if isinstance(value, list):
                    return True
                break
    return False


def _message_problem(value: Any, *, completion: bool) -> str | None:
    """Why a conversational field is invalid, or None."""
    if not isinstance(value, list) or not value:
        return "is not a non-empty list of {'role', 'content'} messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} is not a {{'role': str, 'content': str}} dict (got {m!r:.80})"
    if completion and not "".join(m["content"] for m in value).strip():
        return "has empty content"
    return None


# ------------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------------


def _row_problem(
    row: dict[str, Any], fmt: str, conversational: bool, has_margin: bool, numeric: tuple[str, ...] = ()
) -> tuple[str, str, str] | None:
    """(reason, field, message) for the first problem of a row, or None when the row is valid. `has_margin` checks
    `rm_margin`; `numeric` names the other `NUMERIC_COLUMNS` the row has."""
    for name in ("prompt", *COMPLETION_FIELDS[fmt]):
        value = row[name]
        is_completion = name != "prompt"
        if value is None:
            return R_NOT_STRING, name, "is None (missing or null)"
        if conversational:
            problem = _message_problem(value, completion=is_completion)
            if problem is not None:
                return (R_EMPTY if problem == "has empty content" else R_MESSAGES), name, problem
        elif not isinstance(value, str):
            return R_NOT_STRING, name, f"is not a string (got {type(value).__name__}: {value!r:.80})"
        elif is_completion and not value.strip():
            return R_EMPTY, name, "is empty (after stripping whitespace)"
    if fmt == PREFERENCE and row["chosen"] == row["rejected"]:
        return R_IDENTICAL, "rejected", "is identical to 'chosen' (a pair needs two different responses)"
    for name in ("rm_margin", *numeric) if has_margin else numeric:
        reason, nonnegative = NUMERIC_COLUMNS[name]
        m = row[name]
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            return reason, name, f"is not a number (got {type(m).__name__}: {m!r:.80})"
        if not math.isfinite(m):
            return reason, name, f"is not finite (got {m})"
        if nonnegative and m < 0:
            return reason, name, f"is negative (got {m}; it must be >= 0)"
    return None


def validate(
    dataset: datasets.Dataset,
    source: str,
    *,
    invalid_rows: InvalidRows = "raise",
    index_offset: int = 0,
) -> RawData:
    """Check every row of `dataset` (read from `source`) and add the `index` column (`index_offset` + row).

    Raises `InvalidRowError` naming source, row and field on the first bad row (`invalid_rows="raise"`), or drops
    every bad row, counts it per reason and logs a warning (`invalid_rows="drop"`).
    """
    if invalid_rows not in ("raise", "drop"):
        raise ValueError(f"invalid_rows must be 'raise' or 'drop', got {invalid_rows!r}")
    implicit = {"chosen", "rejected"} <= set(dataset.column_names) and "prompt" not in dataset.column_names
    if implicit:
        dataset = split_implicit_prompt(dataset, source)
    fmt = detect_format(dataset.column_names, source)
    has_margin = "rm_margin" in dataset.column_names
    numeric = tuple(c for c in NUMERIC_COLUMNS if c != "rm_margin" and c in dataset.column_names)
    fields = ["prompt", *COMPLETION_FIELDS[fmt]] + (["rm_margin"] if has_margin else []) + list(numeric)
    columns = dataset.select_columns(fields).with_format(None).to_dict() if len(dataset) else {f: [] for f in fields}
    n = len(dataset)
    conversational = _looks_conversational(columns, fields)
    keep: list[int] = []
    dropped: Counter[str] = Counter()
    examples: list[str] = []
    for i in range(n):
        row = {f: columns[f][i] for f in fields}
        problem = _row_problem(row, fmt, conversational, has_margin, numeric)
        if problem is None:
            keep.append(i)
            continue
        reason, name, what = problem
        message = f"{source}: row {i}: field {name!r} {what}"
        if invalid_rows == "raise":
            raise InvalidRowError(message + "; invalid_rows='drop' drops such rows instead, with a count")
        dropped[reason] += 1
        if len(examples) < 5:
            examples.append(message)
    dataset = dataset.select_columns(fields)  # extra columns would be dropped at tokenization anyway
    dataset = dataset.add_column("index", list(range(index_offset, index_offset + n)))
    if dropped:
        dataset = dataset.select(keep)
    dataset = _normalise_types(dataset, fields, conversational, columns, keep if dropped else None)
    if dropped:
        log.warning(
            "%s: dropped %d of %d rows (invalid_rows='drop'): %s; e.g. %s",
            source,
            n - len(keep),
            n,
            dict(dropped),
            " | ".join(examples),
        )
    return RawData(
        dataset,
        fmt,
        conversational,
        rows_in=n,
        dropped=dict(dropped),
        sources=[source],
        implicit_prompts=n if implicit else 0,
    )


def _normalise_types(
    dataset: datasets.Dataset,
    fields: list[str],
    conversational: bool,
    columns: dict[str, list[Any]],
    keep: list[int] | None,
) -> datasets.Dataset:
    """Cast the validated columns to one schema (text: string, numeric: float64, index: int64), so files of one
    split concatenate whatever their reader inferred (parquet large_string, csv int margins, JSON mixed types)."""
    features = dataset.features.copy()
    for name in fields:
        if name in NUMERIC_COLUMNS:
            features[name] = datasets.Value("float64")
        elif not conversational:
            features[name] = datasets.Value("string")
    features["index"] = datasets.Value("int64")
    if features == dataset.features:
        return dataset

    def castable(name: str) -> bool:
        have, want = dataset.features[name], features[name]
        if have == want:
            return True
        if not isinstance(have, datasets.Value) or not isinstance(want, datasets.Value):
            return False
        if want.dtype == "string":
            return have.dtype in ("string", "large_string")
        return have.dtype.startswith(("int", "uint", "float"))

    if all(castable(name) for name in features):
        return dataset.cast(features)
    # e.g. a column read as JSON values because some (now dropped) rows held non-strings: a cast would JSON-encode
    # the strings, so rebuild the columns from the validated Python values
    rows = keep if keep is not None else range(len(dataset))
    data = {name: [columns[name][i] for i in rows] for name in fields}
    data["index"] = dataset["index"][:]
    return datasets.Dataset.from_dict(data, features=features if not conversational else None)


# ------------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------------


def _expand(files: str | list[str]) -> list[str]:
    paths = [files] if isinstance(files, str) else list(files)
    if not paths:
        raise ValueError("no data files given")
    out: list[str] = []
    for p in paths:
        p = os.path.expanduser(str(p))
        if glob.has_magic(p):
            matched = sorted(glob.glob(p))
            if not matched:
                raise FileNotFoundError(f"data file pattern {p!r} matches no file")
            out.extend(matched)
        else:
            out.append(p)
    return out


def _builder(path: str) -> str:
    name = path.lower()
    for ext, builder in _BUILDERS.items():
        if name.endswith(ext):
            return builder
    raise ValueError(f"{path}: unsupported file type; expected one of {sorted(_BUILDERS)}")


def _merge(parts: list[RawData]) -> RawData:
    fmts = {(p.format, p.conversational) for p in parts}
    if len(fmts) > 1:
        described = ", ".join(
            f"{p.sources[0]}: {p.format}{' (conversational)' if p.conversational else ''}" for p in parts
        )
        raise ValueError(f"the files of one split must share one row format; got {described}")
    dropped: Counter[str] = Counter()
    for p in parts:
        dropped.update(p.dropped)
    dataset = parts[0].dataset if len(parts) == 1 else datasets.concatenate_datasets([p.dataset for p in parts])
    return RawData(
        dataset,
        parts[0].format,
        parts[0].conversational,
        rows_in=sum(p.rows_in for p in parts),
        dropped=dict(dropped),
        sources=[s for p in parts for s in p.sources],
        implicit_prompts=sum(p.implicit_prompts for p in parts),
    )


def load_files(
    files: str | list[str],
    *,
    invalid_rows: InvalidRows = "raise",
    cache_dir: str | None = None,
    prompts_only: bool = False,
) -> RawData:
    """Rows of local `.json`/`.jsonl`/`.parquet`/`.csv` files (globs allowed), each loaded and validated on its own
    (errors name the file), then concatenated in order. `cache_dir` is datasets' cache (None: its default).
    `prompts_only`: only the prompts are read and validated (`validate_prompts`; generation)."""
    parts = []
    offset = 0
    for path in _expand(files):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        builder = _builder(path)
        if os.path.getsize(path) == 0:
            raise UserError(f"{path}: the file is empty: no rows")
        try:
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            # datasets' JSON errors are pyarrow byte offsets; only now (a failure) re-read the file to find the line
            problem = json_problem(path) if builder == "json" else None
            if problem is None and "corresponds to no data" in str(e):  # datasets' words for zero rows (csv header)
                problem = "no rows"
            detail = problem or f"{type(e).__name__}: {e}"
            raise UserError(f"{path}: could not be read as {builder}: {detail}") from e
        if len(ds) == 0:
            raise UserError(f"{path}: the file has no rows")
        check = validate_prompts if prompts_only else validate
        part = check(ds, path, invalid_rows=invalid_rows, index_offset=offset)
        offset += part.rows_in
        parts.append(part)
    return _merge(parts)


def load_hub(name: str, split: str, *, invalid_rows: InvalidRows = "raise", cache_dir: str | None = None) -> RawData:
    """Rows of split `split` of hub dataset `name` (or any path `datasets.load_dataset` understands)."""
    ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    return validate(ds, f"{name}[{split}]", invalid_rows=invalid_rows)


def load_in_memory(
    dataset: datasets.Dataset, *, invalid_rows: InvalidRows = "raise", source: str = IN_MEMORY
) -> RawData:
    """Rows of an in-memory `datasets.Dataset` (a `datasets.DatasetDict` must be indexed by split first)."""
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"{source}: expected a datasets.Dataset, got {type(dataset).__name__}")
    return validate(dataset, source, invalid_rows=invalid_rows)


def validate_prompts(
    dataset: datasets.Dataset,
    source: str,
    *,
    invalid_rows: InvalidRows = "raise",
    index_offset: int = 0,
) -> RawData:
    """Check the `prompt` of every row and add `index`, for generation: format "prompt", the other columns dropped.

    Any file with a `prompt` column serves (prompt-only, preference or SFT rows; their completions are ignored and
    not checked); an implicit-prompt preference file has its prompt split off as in `validate`. The prompt checks
    and errors are `validate`'s.
    """
    if invalid_rows not in ("raise", "drop"):
        raise ValueError(f"invalid_rows must be 'raise' or 'drop', got {invalid_rows!r}")
    implicit = {"chosen", "rejected"} <= set(dataset.column_names) and "prompt" not in dataset.column_names
    if implicit:
        dataset = split_implicit_prompt(dataset, source)
    if "prompt" not in dataset.column_names:
        raise UserError(
            f"{source}: no 'prompt' column; found columns {sorted(dataset.column_names)}; generation reads the "
            "prompts from a 'prompt' column (other columns are ignored)"
        )
    columns = {"prompt": dataset.select_columns(["prompt"]).with_format(None).to_dict()["prompt"]}
    n = len(dataset)
    conversational = _looks_conversational(columns, ["prompt"])
    keep: list[int] = []
    dropped: Counter[str] = Counter()
    for i, value in enumerate(columns["prompt"]):
        problem = _row_problem({"prompt": value}, PROMPT, conversational, has_margin=False)
        if problem is None:
            keep.append(i)
            continue
        reason, name, what = problem
        message = f"{source}: row {i}: field {name!r} {what}"
        if invalid_rows == "raise":
            raise InvalidRowError(message + " (pass invalid_rows='drop' to drop such rows instead, with a count)")
        dropped[reason] += 1
    dataset = dataset.select_columns(["prompt"])
    dataset = dataset.add_column("index", list(range(index_offset, index_offset + n)))
    if dropped:
        dataset = dataset.select(keep)
        log.warning("%s: dropped %d of %d prompts (invalid_rows='drop'): %s", source, n - len(keep), n, dict(dropped))
    dataset = _normalise_types(dataset, ["prompt"], conversational, columns, keep if dropped else None)
    return RawData(
        dataset,
        PROMPT,
        conversational,
        rows_in=n,
        dropped=dict(dropped),
        sources=[source],
        implicit_prompts=n if implicit else 0,
    )
