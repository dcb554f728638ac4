"""The paper's IMDB table (Rho 2025, arXiv:2510.05342, main results) reproduced offline: methods × tiers × seeds on
the cached pipeline stages, with the competitors that read the same reward-model margin another way (ODPO,
margin_target) or none (cDPO, rDPO, hinge), plus the two things the paper's table leaves out: KL beside every reward
(and a reward–KL frontier), and a margin robustness sweep.

    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml                       # the full grid (long)
    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml --methods dpo,madpo --tiers high --seeds 0
    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml --noise-matched      # + cDPO/rDPO at the oracle's ε
    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml --frontier --robustness --seeds 0
    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml --no-table --frontier --frontier-grid 0.1 \
        --frontier-method-grid dpo=0.05,0.1 --frontier-method-grid madpo=0.1,0.2   # a grid per method
    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml --jobs 2   # 2 worker processes x 1 thread each
    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml --pending  # what is left; trains nothing
    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml --max-cells 4   # 4 more cells, then the reports
    python bench/reproduce.py -c configs/pipeline/imdb_1k.yaml --time-budget 120   # cells that finish in 2 h

Every option not listed below is a pipeline flag (`--policy.lr`, `--output_dir`, ...). Every finished cell (policy +
evaluation) and every other number the reports quote (the SFT model's reward, each tier's label noise, pair counts
and reward model) is stored in `--cells-dir` (bench/cellstore.py; commit the files): a rerun, here or on a fresh
clone, skips what is stored, and when everything is stored the reports are rewritten without building a single
pipeline stage. Upstream stages are shared with `python cli.py pipeline` on the same config. Every method gets the
same hyperparameters (the config's `policy` section); only `method`, `tier` and `seed` vary (and β or lr on the
frontier, one grid for every method unless `--frontier-method-grid` gives one its own; margin noise in the robustness
sweep, for MADPO only: DPO reads no margins; ε for the noise-matched cDPO / rDPO cells). The sweep itself lives in
bench/sweep/.

Writes `bench/results/imdb-offline.md` (+ `.json`), and with the options `reward_kl_frontier.png` / `.md` and
`robustness.md` (+ `.json`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# before torch loads OpenMP: spinning OpenMP threads stall each other on a shared CPU (see cli.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # the bench modules import as siblings, whether run as a script or loaded by a test
    sys.path.insert(0, str(BENCH))

from sweep.cells import Cell, aggregate, run_cell  # noqa: E402
from sweep.plan import DEFAULT_METHODS, frontier_grids, items, plan  # noqa: E402
from sweep.runner import sweep  # noqa: E402

from madpo.pipeline.config import METHODS, TIER_NAMES  # noqa: E402
from madpo.pipeline.run import configure_logging, parse_config  # noqa: E402

REPO = BENCH.parent
CELLS = REPO / "bench" / "results" / "cells" / "imdb-offline"


def bench_parser() -> argparse.ArgumentParser:
    """The sweep's own options; the rest of the command line is the pipeline's."""
    p = argparse.ArgumentParser(
        description="methods x tiers x seeds on the cached offline IMDB pipeline; other flags go to the pipeline",
        epilog="Any other argument is a pipeline flag, e.g. -c configs/pipeline/imdb_1k.yaml --policy.lr 1e-4",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods, any of {', '.join(sorted(METHODS))}",
    )
    p.add_argument("--tiers", default=",".join(TIER_NAMES), help="comma-separated tiers")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated policy seeds (data order)")
    p.add_argument(
        "--noise-matched",
        action="store_true",
        help="add cDPO and rDPO per tier with ε = the tier's measured label-flip rate (cdpo_oracle_eps, "
        "rdpo_oracle_eps): it reads the oracle, so it is an upper bound no user can reach",
    )
    p.add_argument("--no-table", action="store_true", help="skip the main grid (run only --frontier/--robustness)")
    p.add_argument("--frontier", action="store_true", help="--frontier-methods over a grid of --frontier-knob")
    p.add_argument(
        "--frontier-methods",
        default="dpo,madpo",
        help="comma-separated methods on the frontier; the report compares each with MADPO at matched KL",
    )
    p.add_argument("--frontier-knob", choices=("beta", "lr"), default="beta")
    p.add_argument("--frontier-grid", default="0.05,0.1,0.2,0.5", help="values of the knob for every frontier method")
    p.add_argument(
        "--frontier-method-grid",
        action="append",
        metavar="METHOD=V1,V2",
        help="one method's own values instead (repeatable), e.g. dpo=0.025,0.05,0.1: at one β DPO stays closer to "
        "the reference than MADPO, so matching KL takes smaller β for DPO or larger for MADPO",
    )
    p.add_argument("--frontier-tier", default="high")
    p.add_argument("--robustness", action="store_true", help="MADPO vs DPO over reward-margin noise levels")
    p.add_argument("--noise-std", default="0,1,2,4", help="Gaussian margin noise σ levels")
    p.add_argument("--flip-fraction", default="0,0.1,0.2,0.3", help="margin sign-flip fractions")
    p.add_argument("--robustness-tier", default="high")
    p.add_argument(
        "--train-identical",
        action="store_true",
        help="train amp-only / reg-only even when no training margin reaches ±τ (their weights then equal MADPO's / "
        "DPO's exactly, so by default their cells reuse those runs)",
    )
    p.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--cells-dir", default=str(CELLS), help="where finished cells and records are stored and found")
    p.add_argument("--pending", action="store_true", help="list the cells and records not yet stored; train nothing")
    p.add_argument(
        "--max-cells", type=int, default=None, help="run at most this many pending cells, then write the reports"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="start no cell that would not finish within this many minutes of the start (by the last cell's time, "
        "else the stored cells' median), so that a session's end kills no half-trained cell; the rest stays pending",
    )
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # a --jobs worker's time.time()
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run the pending cells in this many worker processes (each with trainer.num_threads / jobs threads), "
        "then write the reports from the store; records and reward models come first, in this process",
    )
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "k/n": a --jobs worker runs cells k, k+n, ...
    p.add_argument("--shard-keys", default=None, help=argparse.SUPPRESS)  # the spec keys the workers split
    return p


def main(argv: list[str] | None = None, pipeline: Any = None) -> dict:
    """Parse, check the names, run the sweep (`pipeline`: the Pipeline class, replaceable by a test)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = bench_parser().parse_known_args(argv)
    cfg = parse_config(rest)
    cfg.validate()
    configure_logging()
    for m in items(opts.methods) + items(opts.frontier_methods):
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; expected some of {sorted(METHODS)}")
    for t in items(opts.tiers) + [opts.frontier_tier, opts.robustness_tier]:
        if t not in TIER_NAMES:
            raise SystemExit(f"unknown tier {t!r}; expected some of {list(TIER_NAMES)}")
    if opts.frontier:
        frontier_grids(opts)  # a malformed --frontier-method-grid fails here, before any stage runs
    if opts.max_cells is not None and opts.max_cells < 0:
        raise SystemExit(f"--max-cells {opts.max_cells}: must be >= 0")
    if opts.time_budget is not None and opts.time_budget <= 0:
        raise SystemExit(f"--time-budget {opts.time_budget}: must be > 0 minutes")
    return sweep(opts, argv, cfg, Path(__file__).resolve(), pipeline)


__all__ = ["Cell", "aggregate", "bench_parser", "main", "plan", "run_cell"]

if __name__ == "__main__":
    main()
