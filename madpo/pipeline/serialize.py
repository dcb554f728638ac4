"""JSON-ready values for manifests, results and pair files: `madpo.serialize.jsonable`, re-exported here (numpy
scalars, 0-d tensors, paths, dataclasses; NaN/inf become null, the files are written with allow_nan=False)."""

from __future__ import annotations

from madpo.serialize import jsonable

__all__ = ["jsonable"]
