"""How a logged per-step scalar moved over a run: its distribution over the logged steps of one or more stage
directories (their TensorBoard event files), e.g. β-DPO's batch β, whose epoch mean hides how far it swings.

    python bench/scalar_trace.py runs/paper_size/policy-beta_dpo-low-s0-* --tag train/beta/effective_step \
        --at-most 0.001 --out bench/results/paper_size/beta_dpo_trace.md

Only the steps the run logged are read (every `log_every_n_steps`), so the shares are over those steps.
"""

from __future__ import annotations

import argparse
import glob
import shlex
import sys
from pathlib import Path

import numpy as np


def trace(stage_dir: Path, tag: str) -> np.ndarray:
    """The values of `tag` over the logged steps of a stage directory's TensorBoard events, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: list[tuple[int, float]] = []
    for path in sorted(glob.glob(str(stage_dir / "**" / "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    if not points:
        raise SystemExit(f"{stage_dir}: no scalar {tag!r} in its TensorBoard events")
    return np.array([v for _, v in sorted(points)])


def row(name: str, values: np.ndarray, at_most: float | None, above: float | None) -> str:
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    half = len(values) // 2
    cells = [name, str(len(values)), f"{values.mean():.4g}", f"{values.std(ddof=1):.4g}"]
    cells += [f"{p10:.4g} / {p50:.4g} / {p90:.4g}", f"{values[:half].mean():.4g} / {values[half:].mean():.4g}"]
    if at_most is not None:  # the events hold float32: 1e-3 is logged as 0.0010000000475
        cells.append(f"{(values <= np.float32(at_most)).mean():.0%}")
    if above is not None:
        cells.append(f"{(values > np.float32(above)).mean():.0%}")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dirs", nargs="+", type=Path, help="stage directories (each holds a tensorboard/ dir)")
    parser.add_argument("--tag", default="train/beta/effective_step", help="the scalar to read")
    parser.add_argument("--at-most", type=float, help="also report the share of steps with a value <= this")
    parser.add_argument("--above", type=float, help="also report the share of steps with a value > this")
    parser.add_argument("--out", type=Path, help="write the table here too (markdown)")
    opts = parser.parse_args(argv)
    header = ["run", "logged steps", "mean", "sd", "p10 / p50 / p90", "first / second half mean"]
    header += [f"≤ {opts.at_most:g}"] if opts.at_most is not None else []
    header += [f"> {opts.above:g}"] if opts.above is not None else []
    lines = [
        f"# `{opts.tag}` over the logged steps",
        "",
        f"- Command: `python bench/scalar_trace.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += [row(d.name, trace(d, opts.tag), opts.at_most, opts.above) for d in opts.stage_dirs]
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
