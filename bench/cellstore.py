"""Finished sweep cells as small committed JSON files, so that a sweep resumes on any machine.

A policy cell takes minutes; a sweep of them takes hours, longer than one session, and the next session may be on
another machine with an empty stage cache. Each finished cell is written to `<root>/<name>-<key>.json`, where the key
hashes what defines the cell (the pipeline config, the cell's policy config, the code's pipeline version) and nothing
machine-specific, so a fresh clone that finds the file skips the cell. Commit the directory as cells finish. What
the key cannot hold, the bitwise content of the stages a cell read (they are rebuilt per machine), each cell
records in its result (bench/sweep/builds.py).

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

SPEC_VERSION = 2
"""Bump when what a cell file holds changes meaning, so that old files stop matching."""


def cell_spec(cfg: PipelineConfig, policy: PolicyConfig | None, **extra: Any) -> dict:
    """What defines a cell: the pipeline config without its output dir, display-only trainer fields, the methods
    compared in the pipeline's own results and its default policy section (the cell's own `policy` replaces it; None
    for a cell that trains no policy, such as a reward model's), plus `extra` (a margin source, a label). The
    `reward` section is left out of policy cells that read no reward model (DPO, synthetic margins), so that a change
    of reward model keeps them."""
    pipeline = _canonical(cfg)
    for field in ("output_dir", "policy", "stop_after", "compare_with"):
        pipeline.pop(field, None)
    for field in UNKEYED_TRAINER_FIELDS:
        pipeline["trainer"].pop(field, None)
    if policy is not None and not policy.needs_reward_model:
        pipeline.pop("reward", None)
    return {
        "spec_version": SPEC_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "pipeline": pipeline,
        "policy": _canonical(policy) if policy is not None else None,
        "extra": _canonical(extra),
    }


_ABSENT = object()


def default_spec() -> dict:
    """The spec of the default config and policy: where `compatible` reads a field's default value."""
    return cell_spec(PipelineConfig(), PolicyConfig())


def compatible(stored: Any, current: Any, default: Any = _ABSENT) -> bool:
    """Whether a stored spec stands for the current one: equal, except keys the current code has and the stored spec
    lacks (fields added since it was written) whose value is their default. The versions must be equal."""
    if isinstance(stored, dict) and isinstance(current, dict):
        if not set(stored) <= set(current):
            return False
        defaults = default if isinstance(default, dict) else {}
        for key, value in current.items():
            if key in stored:
                if not compatible(stored[key], value, defaults.get(key, _ABSENT)):
                    return False
            elif key not in defaults or value != defaults[key]:
                return False
        return True
    return stored == current


def _without(mapping: dict, field: str) -> dict:
    return {k: v for k, v in mapping.items() if k != field}


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
        """The stored record `{spec, result, machine, finished}` of this spec, or None. A cell stored before the code
        gained a config field still matches while that field is at its default (`compatible`): adding an option
        does not throw away hours of committed cells."""
        path = self.path(spec)
        if path.exists():
            record = json.loads(path.read_text())
            if record.get("spec") == spec:
                return record
        if not self.root.is_dir():
            return None
        defaults = default_spec()
        for other in sorted(self.root.glob("*.json")):
            record = json.loads(other.read_text())
            if compatible(record.get("spec"), spec, defaults):
                return record
        return None

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

    def variants(self, spec: dict, field: str) -> list[dict]:
        """The stored results of `spec` and of the specs that differ from it only by `extra[field]` (the same
        record of another input build), `spec`'s own first."""
        first = self.get(spec)
        out = [first["result"]] if first is not None else []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else []:
            record = json.loads(path.read_text())
            other = record.get("spec") or {}
            if field in other.get("extra", {}) and {**other, "extra": _without(other["extra"], field)} == spec:
                out.append(record["result"])
        return out

    def pending(self, specs: Iterable[dict]) -> list[dict]:
        """The specs with no stored cell, in order."""
        return [s for s in specs if self.get(s) is None]
