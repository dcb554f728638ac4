"""madpo.serialize (JSON-ready values, table numbers) and madpo.io (atomic writes)."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from madpo.io import atomic_path, atomic_write_json, atomic_write_jsonl, atomic_write_text
from madpo.pipeline.serialize import jsonable as pipeline_jsonable
from madpo.serialize import format_mean_se, format_number, jsonable


@dataclasses.dataclass
class _Opts:
    n: int = 2
    path: Path = Path("a/b")


def test_jsonable_converts_numpy_tensors_paths_dataclasses_and_nonfinite():
    value = {
        1: np.float32(0.5),
        "t": torch.tensor(3),
        "nan": float("nan"),
        "inf_t": torch.tensor(math.inf),
        "p": Path("x/y"),
        "opts": _Opts(),
        "seq": (np.int64(4), [np.float64(-math.inf)]),
    }
    out = jsonable(value)
    assert out == {
        "1": 0.5,
        "t": 3,
        "nan": None,
        "inf_t": None,
        "p": "x/y",
        "opts": {"n": 2, "path": "a/b"},
        "seq": [4, [None]],
    }
    json.dumps(out, allow_nan=False)
    assert pipeline_jsonable is jsonable  # the pipeline's name is a re-export


def test_jsonable_default_handles_unknown_objects():
    obj = object()
    assert jsonable({"o": obj})["o"] is obj  # unchanged: json.dumps refuses it loudly
    assert jsonable({"o": obj, "d": torch.float32, "b": True}, default=str) == {
        "o": str(obj),
        "d": "torch.float32",
        "b": True,
    }


def test_format_number_and_mean_se():
    assert format_number(None) == "–"
    assert format_number(0.12345) == "0.123"
    assert format_number(np.float64(1.0), 1) == "1.0"
    assert format_number(7) == "7" and format_number("x") == "x"
    assert format_mean_se(0.5, 0.0123) == "0.500 ± 0.012 (SE)"
    assert format_mean_se(0.5, None, 6, missing="n/a") == "0.500000 ± n/a (SE)"


def test_atomic_writes_replace_whole_files(tmp_path):
    path = tmp_path / "deep" / "r.json"
    atomic_write_json(path, {"x": float("nan"), "y": np.float32(2.0)})
    assert path.read_text() == '{\n  "x": null,\n  "y": 2.0\n}\n'
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    rows = tmp_path / "rows.jsonl"
    atomic_write_jsonl(rows, [{"a": "é"}, {"b": np.int64(1)}])
    assert rows.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 1}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "r.json", "rows.jsonl"]  # no temp files left


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
