"""Which build of the shared inputs a cell was trained on, and the report section that says so.

The stages every policy cell reads (the SFT model, which is also the reference, the sampled pairs and each tier's
reward-model margins) are keyed by config, not by machine. A new machine that resumes a sweep rebuilds them from the
same config, and on another CPU they come out different bitwise: float reductions in another order change the base
LM's and SFT's weights in the last digits, a sampled token flips where a draw falls near a boundary, and the rest of
that completion follows. So a committed cell and a cell trained on another machine may have read different pairs.
Each cell and record therefore stores content hashes of what it read (`InputBuild`); the report groups them by
build, quotes each build's own label noise and reward-model numbers, and pairs two methods' cells only within one
build. A record or cell stored before builds were recorded has none: its build is "unrecorded", unless it was
declared afterwards (`DECLARED`): a build written into its inputs later, on the evidence of records that computed the
build themselves.

The hash covers what training and evaluation read: the SFT model's weights, config and tokenizer, and the pairs'
texts, labels and sources. It leaves out the model card (it carries its run's throughput) and the oracle's scores in
the pairs files: the oracle is retrained on each machine and its float scores can differ in the last bits while
every text and label is the same (seen here: two avx512_bf16 EPYCs built the same pairs, SFT evaluation and reward
margins, with oracle scores 1e-16 apart). Builds recorded before these were left out hashed them, so no rebuild can
match them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

UNRECORDED = "unrecorded"
"""The build of a cell or record stored before builds were recorded."""
UNHASHED = frozenset({"README.md"})
"""File names the build hash skips: an exported model's card, which carries its run's metrics (throughput among
them), so that it differs between two runs that wrote the same weights."""


def _oracle_field(key: str) -> bool:
    """A pairs-file field the oracle computed (its scores, and whether the label agrees with them)."""
    return "oracle" in key


def _content(path: Path) -> Iterable[bytes]:
    """What the build hash reads of a file: a JSON-lines file's rows without their oracle fields, canonically
    encoded; any other file's bytes."""
    with open(path, "rb") as stream:
        if path.suffix != ".jsonl":
            yield from iter(lambda: stream.read(1 << 20), b"")
            return
        for line in stream:
            if line.strip():
                row = {k: v for k, v in json.loads(line).items() if not _oracle_field(k)}
                yield json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def files_digest(paths: Iterable[Path]) -> str:
    """blake2b (12 hex digits) over the files' names (relative to their common root) and `_content`, in sorted
    order; a directory stands for every file under it but the `UNHASHED` ones."""
    files: list[tuple[str, Path]] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.name not in UNHASHED)
            files += [(str(f.relative_to(path.parent)), f) for f in found]
        else:
            files.append((path.name, path))
    h = hashlib.blake2b(digest_size=6)
    for name, f in sorted(files):
        h.update(name.encode() + b"\0")
        for block in _content(f):
            h.update(block)
    return h.hexdigest()


def array_digest(values: np.ndarray) -> str:
    """blake2b (12 hex digits) of the array's float64 bytes: equal only when every value is equal bitwise."""
    return hashlib.blake2b(np.ascontiguousarray(values, dtype=np.float64).tobytes(), digest_size=6).hexdigest()


@dataclasses.dataclass(frozen=True)
class InputBuild:
    """Content hashes of what a cell reads from the shared stages."""

    build: str
    """The SFT model (its weights, tokenizer and config) and every file of the pairs stage but its report, without
    the model card and the oracle's scores (see the module docstring)."""
    margins: str | None = None
    """The tier's reward-model margins on its training pairs (float32 scoring); None for a cell that reads none."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def shared_build(pipe: Any) -> str:
    """The build hash of a pipeline's SFT model and pairs (reading them builds them if they are not cached)."""
    sft, pairs = pipe.sft(), pipe.pairs()
    pair_files = [pairs.path / rel for name, rel in sorted(pairs.manifest["outputs"].items()) if name != "report"]
    return files_digest([Path(sft.output("model")), *pair_files])


SAME_CONTENT = {"67427f132113": "b5ef5171f4d3"}
"""Builds hashed before the hash left out the model card, each mapped to the later hash of the same content, so that
their cells pair with that build's. The evidence is in the committed records of both builds
(bench/results/cells/paper_size), checked by tests/test_sweep.py: the same train-pair count, label noise and mean
oracle gap (to the oracle's float noise), the same SFT evaluation (2,000 sampled completions), and the same
reward-model margins on 9,980 pairs (digest `8527ae2277cd`)."""


DECLARED = "declared"
"""The key, under a stored record's `inputs`, of the words that say its build was written there after it was stored,
and why. `declared_without_evidence` checks each such build against the store's own records of it."""
EVIDENCE_KINDS = ("sft_eval", "pairs_context")
"""The records that identify a build's content: the SFT model's evaluation (2,000 sampled completions) and a tier's
pairs (count, label noise, mean oracle gap)."""
NOT_CONTENT = frozenset({"inputs", "seconds"})
"""Record fields that say nothing about a build's content: the build itself and a stage's run time."""


def declared_without_evidence(records: dict[str, dict]) -> list[str]:
    """What leaves a declared build unsupported in one store. `records`: {file name: stored result}. A build written
    into records after they were stored (their `inputs` carry `DECLARED`) needs, among those records, an SFT
    evaluation and a pairs record, each equal in every content field to a record of the same kind (and tier) that
    computed that build itself. On one kind of CPU a build reproduces bit for bit, so equality is exact."""

    def kind(name: str, result: dict) -> str:
        prefix = name.split("-", 1)[0]
        return f"{prefix}-{result['tier']}" if prefix == "pairs_context" else prefix

    def content(result: dict) -> dict:
        return {k: v for k, v in result.items() if k not in NOT_CONTENT}

    declared: dict[str, list[tuple[str, dict]]] = {}
    computed: dict[tuple[str, str], list[dict]] = {}
    for name, result in records.items():
        result = result.get("cell", result)
        inputs = result.get("inputs") or {}
        if DECLARED in inputs:
            declared.setdefault(inputs["build"], []).append((name, result))
        elif "build" in inputs and name.startswith(EVIDENCE_KINDS):
            computed.setdefault((inputs["build"], kind(name, result)), []).append(content(result))
    problems = []
    for build, items in declared.items():
        evidence = [(name, r) for name, r in items if name.startswith(EVIDENCE_KINDS)]
        for needed in EVIDENCE_KINDS:
            if not any(name.startswith(needed) for name, _ in evidence):
                problems.append(f"build {build}: no declared {needed} record to compare with the build's own")
        for name, result in evidence:
            own = computed.get((build, kind(name, result)), [])
            if not own:
                problems.append(f"build {build}: {name}: the store has no {kind(name, result)} record it computed")
            elif content(result) not in own:
                problems.append(f"build {build}: {name} differs from the build's own {kind(name, result)} record")
    return problems


def build_of(item: dict | Any | None) -> str:
    """The build label of a stored record's result, or of a Cell: its build hash (the later hash of the same content
    for an old one in `SAME_CONTENT`), else `UNRECORDED`."""
    inputs = item.get("inputs") if isinstance(item, dict) else getattr(item, "inputs", None)
    label = (inputs or {}).get("build") or UNRECORDED
    return SAME_CONTENT.get(label, label)


def builds_section(cells: list, contexts: dict[str, dict]) -> list[str]:
    """The report's "input builds" section, shown when the cells or records span more than one build: per build,
    its cells and its own records (label noise, reward-model accuracy and share of down-weighted pairs, the SFT
    reward), so that a reader sees what each cell was trained on. `contexts`: {build: {'pairs': {tier: record},
    'reward': {tier: record}, 'sft': record | None}}."""
    used: dict[str, list] = {}
    for c in cells:
        used.setdefault(build_of(c), []).append(c)
    builds = list(dict.fromkeys([*contexts, *used]))
    if len(builds) <= 1:
        return []
    lines = [
        "",
        f"## Input builds ({len(builds)})",
        "",
        "The SFT model, the sampled pairs and the reward models are rebuilt from the config on each machine that "
        "resumes the sweep, and on another CPU they differ bitwise (bench/sweep/builds.py). These cells were trained "
        "on more than one build: a mean over seeds then also spans rebuilds, and a difference between two methods "
        "is paired by seed only within one build. Each build's own records:",
        "",
        "| build | cells (method tier seed) | labels disagree with the oracle | RM val accuracy | m < 0 | SFT reward | "
        "MADPO − DPO (seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in builds:
        ctx = contexts.get(b, {})
        pairs, reward, sft = ctx.get("pairs", {}), ctx.get("reward", {}), ctx.get("sft")
        names = ", ".join(f"{c.method} {c.tier} s{c.seed}" for c in used.get(b, [])) or "–"
        noise = ", ".join(f"{t} {r['frac_disagree']:.1%}" for t, r in pairs.items() if r) or "–"
        acc = ", ".join(f"{t} {r['rm_val_accuracy']:.3f}" for t, r in reward.items() if r) or "–"
        down = ", ".join(f"{t} {r['downweighted']['frac']:.1%}" for t, r in reward.items() if r) or "–"
        sft_text = f"{sft['reward']['mean']:.3f} ± {sft['reward']['se']:.3f}" if sft else "–"
        lines.append(f"| `{b}` | {names} | {noise} | {acc} | {down} | {sft_text} | {_gain(used.get(b, []))} |")
    lines += ["", "The table's other rows quote the first build's records."]
    stored_as = {(c.inputs or {}).get("build") for c in cells} & set(SAME_CONTENT)
    for old in sorted(stored_as):
        lines[-1] += (
            f" Cells stored with build `{old}` (hashed before the hash left out the model card) are listed under "
            f"`{SAME_CONTENT[old]}`, the same content (`SAME_CONTENT` in bench/sweep/builds.py)."
        )
    declared = sorted({c.inputs["build"] for c in cells if DECLARED in (c.inputs or {})})
    if declared:
        lines[-1] += (
            " Cells stored before builds were recorded and declared afterwards are listed under the declared build "
            f"({', '.join(f'`{b}`' for b in declared)}): their SFT evaluation and pairs equal that build's own records "
            "in every number (`declared` in their inputs says why; checked by tests/test_sweep.py)."
        )
    if UNRECORDED in builds:
        lines[-1] += (
            f" `{UNRECORDED}`: stored before builds were recorded; which machine built their inputs is not known, so "
            "they count as one build."
        )
    return lines


def _gain(cells: list) -> str:
    """MADPO − DPO in mean oracle reward per tier, averaged over the seeds that have both in this build."""
    by = {(c.method, c.tier, c.seed): c.mean for c in cells}
    out = []
    for tier in dict.fromkeys(c.tier for c in cells):
        seeds = [s for (m, t, s) in by if m == "madpo" and t == tier and ("dpo", t, s) in by]
        if seeds:
            d = float(np.mean([by[("madpo", tier, s)] - by[("dpo", tier, s)] for s in seeds]))
            out.append(f"{tier} {d:+.3f} ({len(seeds)})")
    return ", ".join(out) or "–"
