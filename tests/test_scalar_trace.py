"""bench/scalar_trace.py reads a per-step scalar back from a stage's TensorBoard events: its statistics against
hand-computed values, and the float32 floor (β-DPO's β_min is logged as float32) counted as at the floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from tests.helpers import load_bench_script


def test_the_trace_of_a_logged_scalar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_bench_script("scalar_trace", monkeypatch)
    stage = tmp_path / "policy-beta_dpo-low-s0-abc"
    values = [1e-3, 0.1, 0.3, 1e-3, 0.2, 0.25]  # steps logged out of order must come back in step order
    writer = SummaryWriter(str(stage / "tensorboard" / "version_0"))
    for step in (50, 10, 40, 0, 30, 20):
        writer.add_scalar("train/beta/effective_step", values[step // 10], step)
    writer.close()
    got = script.trace(stage, "train/beta/effective_step")
    assert np.allclose(got, values, rtol=1e-6)  # float32 in the events
    out = tmp_path / "trace.md"
    text = script.main([str(stage), "--at-most", "0.001", "--above", "0.2", "--out", str(out)])
    row = next(line for line in text.splitlines() if line.startswith("| policy-beta_dpo"))
    v = np.array(values)
    first, second = v[:3].mean(), v[3:].mean()
    expected = f"| 6 | {v.mean():.4g} | {v.std(ddof=1):.4g} | "
    assert expected in row and f"| {first:.4g} / {second:.4g} | 33% | 33% |" in row
    assert out.read_text() == text
    with pytest.raises(SystemExit, match="no scalar 'train/missing'"):
        script.main([str(stage), "--tag", "train/missing"])
