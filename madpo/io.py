"""Atomic file writes: write to a temporary name beside the target, then `os.replace` it into place, so a reader (or
a run resumed after a crash) sees the complete old file, the complete new one, or none, never half a file.

A leaf module (standard library, plus `madpo.serialize`), so every layer may import it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from madpo.serialize import jsonable


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (parents created); on a clean exit it replaces `path`, on an exception it
    is removed. For writers that take a file name (e.g. `safetensors.torch.save_file(tensors, str(tmp))`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # unique per process and call
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> Path:
    """`jsonable(payload)` as JSON (NaN/inf as null, `allow_nan=False`), with a trailing newline."""
    return atomic_write_text(path, json.dumps(jsonable(payload), indent=indent, allow_nan=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """One `jsonable(row)` per line (UTF-8, `ensure_ascii=False`, NaN/inf as null), streamed to the temporary file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(jsonable(row), ensure_ascii=False, allow_nan=False) + "\n")
    return Path(path)


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_jsonl", "atomic_write_text"]
