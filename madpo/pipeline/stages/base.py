"""Stage bookkeeping: frozen stage inputs and their keys, manifests, caching, resumption, error wrapping.

A stage is a function of one frozen `StageInputs` object (its config section, the trainer settings and derived values
it reads, its upstream `StageResult`s) and of the stage directory. The stage key is the blake2b hash of that object,
an upstream result entering as its label and key only, so what a stage can read is what its key covers: a stage body
never sees the `TrainerConfig` or any other unhashed setting, only the `Context` (output directory, progress bars).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from madpo.io import atomic_write_json, atomic_write_jsonl
from madpo.losses import PreferenceLoss, class_path
from madpo.pipeline.config import TrainerConfig

PIPELINE_VERSION = 2
"""Part of every stage hash: bump it when a stage's behaviour changes, so old caches are not reused."""
MANIFEST = "stage.json"


class StageError(RuntimeError):
    """A stage failed; the message starts with 'stage <name>:' and keeps the cause's message (row, field...)."""


@dataclass
class StageResult:
    """A finished stage: its directory, hash and manifest."""

    name: str
    """Stage kind (reviews, tokenizer, ..., evaluate)."""
    label: str
    """Directory prefix, e.g. 'reward-high' or 'policy-madpo-high-s0'."""
    path: Path
    """The stage directory."""
    key: str
    """The stage hash."""
    manifest: dict
    """The contents of stage.json."""
    cached: bool
    """True when this run found the stage finished and skipped it."""

    def output(self, name: str) -> str:
        """An output of the stage: a path inside the stage directory, or a reference kept as given (a hub id)."""
        value = self.manifest["outputs"][name]
        candidate = self.path / value
        return str(candidate) if candidate.exists() else value

    @property
    def stats(self) -> dict:
        return self.manifest.get("stats", {})

    @property
    def seconds(self) -> float:
        return float(self.manifest.get("seconds", 0.0))


def _canonical(value: Any) -> Any:
    """Plain JSON data for hashing: an upstream result is its label and key (not its path or manifest), a loss its
    class and options, a dataclass its fields."""
    if isinstance(value, StageResult):
        return {"label": value.label, "key": value.key}
    if isinstance(value, PreferenceLoss):
        return {"class": class_path(value), **_canonical(value.init_args())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(name: str, config: dict, upstream: Sequence[StageResult]) -> str:
    """blake2b (12 hex digits) of the stage name, the pipeline version, its config and its inputs' hashes."""
    payload = {
        "version": PIPELINE_VERSION,
        "stage": name,
        "config": _canonical(config),
        "upstream": {u.label: u.key for u in upstream},
    }
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=6).hexdigest()


UNKEYED_TRAINER_FIELDS = ("progress_bar", "num_threads")
"""Trainer fields no stage key holds: progress bars change no output; the thread count is set once per process
(`bench/reproduce.py --jobs` splits threads between workers) and changes only the order of float reductions."""


@dataclass(frozen=True)
class TrainingSettings:
    """The trainer settings a training stage reads (through `training.fit` and `training.optimizer_options`):
    every `TrainerConfig` field but the display-only `UNKEYED_TRAINER_FIELDS`."""

    accelerator: str
    devices: int
    precision: str
    gradient_clip_val: float | None
    log_every_n_steps: int

    @classmethod
    def of(cls, trainer: TrainerConfig) -> TrainingSettings:
        from madpo.hardware import resolve_precision

        settings = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(cls)}
        settings["precision"] = resolve_precision(trainer.precision, trainer.accelerator)
        return cls(**settings)


TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingSettings))
"""What a training stage reads of the trainer settings."""


def device_for(accelerator: str) -> str:
    """Where sampling and evaluation run: cuda when the trainer's accelerator is (or auto-detects) a GPU."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


@dataclass(frozen=True)
class StageInputs:
    """Everything a stage reads, frozen; subclasses name their stage in `stage`. Its hash is the stage key."""

    stage: ClassVar[str]

    def upstream(self) -> list[StageResult]:
        """The upstream results among the fields (also inside nested inputs such as the policy's margins)."""
        return list(_results(self))

    @property
    def key(self) -> str:
        return stage_key(self.stage, _canonical(self), [])


def _results(value: Any) -> Iterator[StageResult]:
    if isinstance(value, StageResult):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _results(getattr(value, f.name))


write_json_atomic = atomic_write_json
"""JSON through a temporary file and a rename: readers never see half a file."""
write_jsonl = atomic_write_jsonl


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def say(message: str) -> None:
    """A pipeline progress line on stdout."""
    print(f"[madpo] {message}", flush=True)


@dataclass
class StageOutput:
    """What a stage body returns: named outputs (paths relative to the stage dir, or references) and statistics."""

    outputs: dict[str, str]
    stats: dict


@dataclass
class Context:
    """What every stage shares and no key holds: where to write, whether to show progress bars, and the log of
    stages run or found cached."""

    output_dir: Path
    progress_bar: bool = True
    results: list[StageResult] = dataclasses.field(default_factory=list)

    @property
    def cache_dir(self) -> Path:
        """The DataModule's scoring cache (rm_margin, reference log-probs), shared by all stages: keyed by content."""
        return self.output_dir / "scoring-cache"

    def record(self, result: StageResult) -> None:
        if all(r.path != result.path for r in self.results):
            self.results.append(result)


InputsT = TypeVar("InputsT", bound=StageInputs)


def run_stage(
    ctx: Context,
    inputs: InputsT,
    body: Callable[[InputsT, Path, Context], StageOutput],
    *,
    label: str | None = None,
) -> StageResult:
    """Run `body(inputs, stage_dir, ctx)` unless the stage is already finished; write its manifest last
    (atomically). A directory without a manifest was interrupted: it is wiped and redone."""
    name = inputs.stage
    label = label or name
    key = inputs.key
    upstream = inputs.upstream()
    path = ctx.output_dir / f"{label}-{key}"
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        result = StageResult(name, label, path, key, manifest, cached=True)
        say(f"stage {label}: cached ({path}, took {result.seconds:.1f} s when it ran)")
        ctx.record(result)
        return result
    if path.exists():
        say(f"stage {label}: {path} has no {MANIFEST} (an interrupted run): redoing it")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    say(f"stage {label}: running -> {path}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), _load()
    try:
        out = body(inputs, path, ctx)
    except StageError:
        raise
    except Exception as e:
        context = f"[{label}] " if label != name else ""
        raise StageError(f"stage {name}: {context}{e}") from e
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    manifest = {
        "stage": name,
        "label": label,
        "key": key,
        "pipeline_version": PIPELINE_VERSION,
        "config": _canonical(inputs),
        "upstream": {u.label: {"key": u.key, "path": str(u.path)} for u in upstream},
        "outputs": out.outputs,
        "stats": out.stats,
        "started": started,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "load_average": {"start": load_start, "end": _load()},
        "torch_threads": _torch_threads(),
        "versions": _versions(),
    }
    write_json_atomic(manifest_path, manifest)
    say(f"stage {label}: done in {seconds:.1f} s")
    result = StageResult(name, label, path, key, json.loads(manifest_path.read_text()), cached=False)
    ctx.record(result)
    return result


def _load() -> float | None:
    """The 1-minute load average (how busy the machine was: timings on a shared machine need it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _versions() -> dict[str, str]:
    import lightning
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }


def check_prompt_lengths(prompts: Sequence[str], tokenizer: Any, max_prompt_length: int, what: str) -> None:
    """Stop (naming the row) when a prompt is longer than the prompt budget: the DataModule would drop or cut it."""
    from madpo.pipeline.generate import encode_prompt

    for i, prompt in enumerate(prompts):
        n = len(encode_prompt(tokenizer, prompt))
        if n > max_prompt_length:
            raise ValueError(
                f"{what} row {i}: the prompt has {n} tokens (BOS included), more than the maximum prompt length "
                f"{max_prompt_length}; prompt starts {prompt[:80]!r}"
            )
