"""Values for files: JSON-ready values and the numbers of results tables as text.

A leaf module (standard library and numpy only), so every layer may import it. `jsonable` turns numpy scalars, 0-d
tensors and arrays, paths and dataclasses into JSON values and makes NaN/inf null, so files can be written with
`allow_nan=False`. `madpo.pipeline.serialize.jsonable` is this function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MISSING = "–"


def jsonable(value: Any, *, default: Callable[[Any], Any] | None = None) -> Any:
    """`value` as plain JSON data: dict keys become strings, lists/tuples lists, numpy scalars and 0-d tensors/arrays
    Python numbers, paths strings, dataclass instances dicts, and non-finite floats None.

    Anything else is returned unchanged (`default=None`, so `json.dumps` refuses it loudly) or passed to `default`
    (e.g. `default=str` for hyperparameters that may hold arbitrary objects)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, default=default) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, default=default) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), default=default)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:  # 0-d tensors and arrays
        return jsonable(value.item(), default=default)
    return value if default is None else default(value)


def format_number(value: Any, digits: int = 3, *, missing: str = MISSING) -> str:
    """A table cell: floats (numpy floats too) with `digits` decimals, None as `missing`, anything else `str()`."""
    if value is None:
        return missing
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_mean_se(mean: Any, se: Any, digits: int = 3, *, missing: str = MISSING) -> str:
    """`mean ± se (SE)`, each through `format_number` (an SE of None, e.g. for n = 1, shows as `missing`)."""
    return f"{format_number(mean, digits, missing=missing)} ± {format_number(se, digits, missing=missing)} (SE)"


__all__ = ["MISSING", "format_mean_se", "format_number", "jsonable"]
