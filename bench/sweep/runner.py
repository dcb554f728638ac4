"""Running a sweep: the records it needs, its pending cells (here, or in `--jobs` worker processes), and the reports
from the store.

The order matters for "a fully stored sweep builds no stage": every step asks the store first (`Records`), and the
pipeline is built only by the first record or cell that is missing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cellstore import CellStore

from madpo.pipeline.config import PipelineConfig
from madpo.pipeline.stages import policy_label, say, write_json_atomic

from .cells import Cell, Records
from .figures import frontier_report, robustness_report
from .margin_best import margin_best_rows
from .plan import Planned, context_tiers, plan, unique_runs
from .report import cells_json, main_table

_DROP_ON_CONTINUE = {
    "--max-cells": 1,
    "--pending": 0,
    "--shard": 1,
    "--shard-keys": 1,
    "--time-budget": 1,
    "--deadline": 1,
}


@dataclass
class Budget:
    """`--time-budget`: start a cell only if it can finish by the deadline, so that a session's end (which kills
    what still runs) loses no half-trained cell. A cell is expected to take as long as the last one this process ran
    (same threads, same machine), else the median of the sweep's stored cells, else nothing is known and it starts."""

    deadline: float | None
    """time.time() by which every started cell should be finished; None: no limit."""
    estimate: float | None = None
    """Expected seconds of the next cell."""

    def allows(self) -> bool:
        return self.deadline is None or time.time() + (self.estimate or 0.0) <= self.deadline

    def timed(self, run: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        out = run()
        self.estimate = time.perf_counter() - began
        return out

    def stop_message(self, left: int) -> str:
        minutes = max(0.0, ((self.deadline or 0.0) - time.time()) / 60)
        return (
            f"bench: time budget: {left} cells left unstarted ({minutes:.0f} min left, a cell takes about "
            f"{(self.estimate or 0.0) / 60:.0f} min); they are pending in the reports"
        )


def stored_seconds(records: Records, runs: list[Planned]) -> float | None:
    """Median wall time (policy + evaluation) of this sweep's stored cells; None when none is stored."""
    seconds = [c.policy_seconds + c.eval_seconds for p in runs if (c := records.cell(p.spec)) is not None]
    return float(np.median(seconds)) if seconds else None


def continue_argv(argv: list[str]) -> list[str]:
    """`argv` without the options that limit or only list a run: the command that finishes the sweep."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _DROP_ON_CONTINUE:
            skip = 0 if "=" in arg else _DROP_ON_CONTINUE[name]
            continue
        out.append(arg)
    return out


def contexts(records: Records, opts: argparse.Namespace, compute: bool) -> tuple[dict, dict]:
    """The pairs and reward records of the tiers the table needs (computed and stored when missing, if `compute`)."""
    pairs_tiers, reward_tiers = context_tiers(opts)
    pairs = {t: records.pairs_context(t, compute) for t in pairs_tiers}
    reward = {t: records.reward_context(t, compute) for t in reward_tiers}
    return pairs, reward


def stored_cells(records: Records, planned: list[Planned]) -> tuple[dict[str, list[Cell]], list[Planned]]:
    """The stored cells per report, each under its planned name and labels, and the planned cells not stored."""
    by_report: dict[str, list[Cell]] = {}
    pending = []
    for p in planned:
        cell = records.cell(p.spec) if p.spec is not None else None
        if cell is None:
            pending.append(p)
            continue
        cell.method, cell.extra = p.method, dict(p.extra)
        by_report.setdefault(p.report, []).append(cell)
    return by_report, pending


def print_pending(records: Records, opts: argparse.Namespace, cfg: PipelineConfig) -> dict:
    """--pending: every record and cell not yet stored, with its key; reads the store only."""
    pairs, reward = contexts(records, opts, compute=False)
    missing = [f"record: pairs context / {t}" for t, c in pairs.items() if c is None]
    missing += [f"record: reward-model context / {t}" for t, c in reward.items() if c is None]
    if not opts.no_table and records.sft(compute=False) is None:
        missing.insert(0, "record: SFT evaluation")
    planned = plan(opts, cfg, pairs, reward)
    seen, cells = set(), []
    for p in planned:
        if (p.spec is None or records.store.get(p.spec) is None) and (p.spec is None or p.key not in seen):
            seen.add(p.key)
            cells.append(p)
    for line in missing:
        print(line)
    for p in cells:
        print(f"cell: {p.label} {p.key}")
    total = len(unique_runs(planned)) + sum(p.spec is None for p in planned)
    print(f"{len(cells)} pending cells of {total} planned, {len(missing)} pending records")
    median = stored_seconds(records, [p for p in planned if p.spec is not None])
    if median is not None and cells:
        # a plan for the sessions left: the stored cells ran at their own thread counts, on their own machines
        print(
            f"the stored cells took a median {median / 60:.1f} min each (policy + evaluation): about "
            f"{len(cells) * median / 3600:.1f} cell-hours are left"
        )
    return {"pending_cells": [p.label for p in cells], "pending_records": missing, "median_cell_seconds": median}


def run_workers(
    opts: argparse.Namespace,
    argv: list[str],
    cfg: PipelineConfig,
    script: Path,
    keys: list[str],
    budget: Budget,
) -> None:
    """`--jobs n`: n copies of the script, worker k running cells k, k+n, ... of `keys` and storing each one it
    finishes (they share the stage output dir and the store, nothing else). Threads are split between them."""
    threads = max(1, (cfg.trainer.num_threads or os.cpu_count() or 1) // opts.jobs)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        keys_file = Path(scratch) / "keys.json"
        keys_file.write_text(json.dumps(keys))
        procs = []
        for k in range(opts.jobs):
            cmd = [sys.executable, str(script), *continue_argv(argv), "--shard", f"{k}/{opts.jobs}"]
            cmd += ["--shard-keys", str(keys_file), "--trainer.num_threads", str(threads)]
            if budget.deadline is not None:
                cmd += ["--deadline", repr(budget.deadline)]
            procs.append(subprocess.Popen([*cmd, "--trainer.progress_bar", "false"]))
        failed = [k for k, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise SystemExit(f"bench: workers {failed} failed (see their output above); finished cells are stored")


def sweep(
    opts: argparse.Namespace,
    argv: list[str],
    cfg: PipelineConfig,
    script: Path,
    pipeline: Callable[[PipelineConfig], Any] | None = None,
) -> dict[str, Any]:
    """The whole invocation after parsing; returns what it wrote ({report: path}) or listed (--pending)."""
    start = time.perf_counter()
    deadline = opts.deadline
    if deadline is None and opts.time_budget is not None:
        deadline = time.time() + 60 * opts.time_budget
    records = Records(cfg, CellStore(Path(opts.cells_dir)), pipeline)
    if opts.pending:
        return print_pending(records, opts, cfg)
    pairs, reward = contexts(records, opts, compute=True)
    planned = plan(opts, cfg, pairs, reward)
    runs = unique_runs(planned)
    if opts.shard:
        k, n = (int(v) for v in opts.shard.split("/"))
        wanted = json.loads(Path(opts.shard_keys).read_text()) if opts.shard_keys else [p.key for p in runs]
        by_key = {p.key: p for p in runs}
        mine = [by_key[key] for key in wanted[k::n] if key in by_key]
        say(f"bench worker {k}/{n}: {len(mine)} cells")
        budget = Budget(deadline, stored_seconds(records, runs))
        for i, p in enumerate(mine, 1):
            if records.store.get(p.spec) is None:
                if not budget.allows():
                    say(budget.stop_message(len(mine) - i + 1))
                    break
                say(f"bench worker {k}/{n}: cell {i}/{len(mine)}: {policy_label(p.policy)}")
                budget.timed(lambda p=p: records.run(p.policy, p.spec, policy_label(p.policy)))
        return {}
    pending = [p for p in runs if records.store.get(p.spec) is None]
    todo = pending if opts.max_cells is None else pending[: opts.max_cells]
    say(f"bench: {len(runs)} cells, {len(runs) - len(pending)} stored, {len(todo)} to run now")
    budget = Budget(deadline, stored_seconds(records, runs))
    sft = records.sft() if not opts.no_table else None
    if todo:
        # this machine's input build: its own records where the stored ones were computed on another build
        records.record_build(list(pairs), list(reward), sft=not opts.no_table)
        records.check_margins({p.policy.tier for p in todo if p.policy.needs_reward_model})
    if todo and opts.jobs > 1:
        # the reward models first, here, so that no two workers train the same one
        for tier in sorted({p.policy.tier for p in todo if p.policy.needs_reward_model}):
            records.pipe.reward(tier)
        run_workers(opts, argv, cfg, script, [p.key for p in todo], budget)
    else:
        for i, p in enumerate(todo, 1):
            if not budget.allows():
                say(budget.stop_message(len(todo) - i + 1))
                break
            say(f"bench: cell {i}/{len(todo)}: {p.label}")
            budget.timed(lambda p=p: records.run(p.policy, p.spec, policy_label(p.policy)))
            if p.report == "table":  # partial reports after every table cell: a long sweep can be read meanwhile
                write_reports(opts, argv, cfg, records, planned, sft, pairs, reward, time.perf_counter() - start)
    written = write_reports(opts, argv, cfg, records, planned, sft, pairs, reward, time.perf_counter() - start)
    say(f"bench: done in {(time.perf_counter() - start) / 60:.1f} min; wrote {written}")
    return written


def write_reports(
    opts: argparse.Namespace,
    argv: list[str],
    cfg: PipelineConfig,
    records: Records,
    planned: list[Planned],
    sft: dict | None,
    pairs: dict,
    reward: dict,
    wall: float,
) -> dict[str, str]:
    """Every report this invocation asked for, from the store."""
    out_dir = Path(opts.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_report, pending = stored_cells(records, planned)
    again = continue_argv(argv)
    written: dict[str, str] = {}
    if not opts.no_table:
        assert sft is not None
        cells = by_report.get("table", [])
        tiers = list(pairs)
        builds = records.context_builds(list(pairs), list(reward), sft=True)
        md = main_table(cfg, argv, wall, cells, sft, pairs, reward, pending, Path(opts.cells_dir), again, builds)
        (out_dir / "imdb-offline.md").write_text(md)
        write_json_atomic(
            out_dir / "imdb-offline.json",
            {
                "cells": cells_json(cells),
                "sft": sft["reward"],
                "argv": argv,
                "downweighted": {t: c["downweighted"] for t, c in reward.items() if c},
                "rm_val_accuracy": {t: c["rm_val_accuracy"] for t, c in reward.items() if c},
                "frac_disagree": {t: c["frac_disagree"] for t, c in pairs.items() if c},
                "train_pairs_per_tier": {t: c["n_train"] for t, c in pairs.items() if c},
                "eval_pairs_per_tier": {t: c["n_eval"] for t, c in pairs.items() if c},
                "margin_best": margin_best_rows(cells, tiers),
                "input_builds": builds,
                "pending": [{"label": p.label, "key": p.key} for p in pending if p.report == "table"],
                "continue": f"python bench/reproduce.py {' '.join(again)}",
            },
        )
        written["table"] = str(out_dir / "imdb-offline.md")
    if opts.frontier:
        cells = by_report.get("frontier", [])
        md = frontier_report(cfg, argv, wall, cells, opts.frontier_knob, out_dir)
        (out_dir / "reward_kl_frontier.md").write_text(md)
        write_json_atomic(
            out_dir / "reward_kl_frontier.json", {"cells": cells_json(cells), "knob": opts.frontier_knob, "argv": argv}
        )
        written["frontier"] = str(out_dir / "reward_kl_frontier.png")
    if opts.robustness:
        cells = by_report.get("robustness", [])
        (out_dir / "robustness.md").write_text(robustness_report(cfg, argv, wall, cells))
        write_json_atomic(out_dir / "robustness.json", {"cells": cells_json(cells), "argv": argv})
        written["robustness"] = str(out_dir / "robustness.md")
    return written
