"""Where a `.json`/`.jsonl` data file breaks JSON, in lines and columns.

datasets reads JSON with pyarrow, whose errors give byte offsets or none at all; after a failed read
(`madpo.data.formats.load_files`) the file is re-read with Python's json module to name the line.
"""

from __future__ import annotations

import json


def _json_lines_problem(path: str) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object ('line 3, column 14: ...'), 'no rows' when every
    line is blank, else None."""
    rows = 0
    with open(path, "rb") as f:  # bytes: a decoding error then names its own line, not a later buffered one
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")  # so an error at the end points into the line
            except UnicodeDecodeError as e:
                return f"line {number}: not UTF-8 text ({e.reason})"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {number}, column {e.colno}: invalid JSON ({e.msg})"
            if not isinstance(value, dict):
                return f"line {number}: expected a JSON object ({{...}}) per line, got {type(value).__name__}"
            rows += 1
    return None if rows else "no rows (every line is blank)"


def json_problem(path: str) -> str | None:
    """Where a `.json`/`.jsonl` file breaks JSON, in lines and columns (None when Python's json reads it fine).

    A `.jsonl` file must hold one object per line; a `.json` file may also be one document (a list of objects), as
    datasets' json reader accepts both.
    """
    lines_problem = _json_lines_problem(path)
    if lines_problem is None or path.lower().endswith(".jsonl"):
        return lines_problem
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):  # one document: its own position says more than the first bad line
            return f"line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})"
        return lines_problem
    return "no rows (an empty JSON list)" if document == [] else None
