"""Finished sweep cells as small committed JSON files, so that a sweep resumes on any machine.

A policy cell takes minutes; a sweep of them takes hours, longer than one session, and the next session may be on
another machine with an empty stage cache. Each finished cell is written to `<root>/<name>-<key>.json`, where the key
hashes what defines the cell (the pipeline config, the cell's policy config, the code's pipeline version) and nothing
machine-specific, so a fresh clone that finds the file skips the cell. Commit the directory as cells finish.

    store = CellStore(REPO / "bench" / "results" / "cells" / "imdb-offline")
    spec = cell_spec(cfg, policy)
    result = store.get(spec) or store.put(spec, run_it(), name=policy_label(policy))["result"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from madpo.io import atomic_write_json
from madpo.pipeline.config import PipelineConfig, PolicyConfig
from madpo.pipeline.stages.base import PIPELINE_VERSION, UNKEYED_TRAINER_FIELDS, _canonical

SPEC_VERSION = 1
"""Bump when what a cell file holds changes meaning, so that old files stop matching."""


def cell_spec(cfg: PipelineConfig, policy: PolicyConfig, **extra: Any) -> dict:
    """What defines a cell: the pipeline config without its output dir, display-only trainer fields and default
    policy section (the cell's own `policy` replaces it), plus `extra` (a margin source, a label)."""
    pipeline = _canonical(cfg)
    for field in ("output_dir", "policy", "stop_after"):
        pipeline.pop(field, None)
    for field in UNKEYED_TRAINER_FIELDS:
        pipeline["trainer"].pop(field, None)
    return {
        "spec_version": SPEC_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "pipeline": pipeline,
        "policy": _canonical(policy),
        "extra": _canonical(extra),
    }


def spec_key(spec: dict) -> str:
    """blake2b (16 hex digits) of the spec's canonical JSON."""
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=8).hexdigest()


@dataclasses.dataclass
class CellStore:
    """Cell files under `root`, one per spec: `get` finds a finished one, `put` writes one atomically."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def path(self, spec: dict, name: str = "cell") -> Path:
        key = spec_key(spec)
        found = sorted(self.root.glob(f"*-{key}.json"))
        return found[0] if found else self.root / f"{name}-{key}.json"

    def get(self, spec: dict) -> dict | None:
        """The stored record `{spec, result, machine, finished}` of this spec, or None."""
        path = self.path(spec)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return record if record.get("spec") == spec else None

    def put(self, spec: dict, result: dict, *, name: str = "cell") -> dict:
        """Write `result` for `spec` (`name` prefixes the file name for a reader) and return the record."""
        record = {
            "spec": spec,
            "result": result,
            "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(self.path(spec, name), record)
        return record

    def pending(self, specs: Iterable[dict]) -> list[dict]:
        """The specs with no stored cell, in order."""
        return [s for s in specs if self.get(s) is None]
