"""bench/cellstore.py: a stored cell is found by its spec on any machine, is not found for another spec, and stays
valid when the code gains a config field whose value is the default (but not when the field is set)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from madpo.pipeline.config import PipelineConfig, PolicyConfig
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from cellstore import CellStore, cell_spec, compatible, default_spec  # noqa: E402


def _drop(spec: dict, *path: str) -> dict:
    """A copy of `spec` without the key at `path`: the spec as code without that field wrote it."""
    out = json.loads(json.dumps(spec))
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def test_put_then_get_finds_the_cell_and_only_for_its_spec(tmp_path: Path) -> None:
    store, cfg = CellStore(tmp_path), PipelineConfig()
    spec = cell_spec(cfg, dataclasses.replace(cfg.policy, method="dpo"), source="dpo")
    assert store.get(spec) is None
    store.put(spec, {"mean": 1.0}, name="policy-dpo")
    assert store.get(spec)["result"] == {"mean": 1.0} and store.pending([spec]) == []
    other = cell_spec(cfg, dataclasses.replace(cfg.policy, method="dpo", seed=1), source="dpo")
    assert store.get(other) is None and store.pending([spec, other]) == [other]


def test_dpo_cells_do_not_depend_on_the_reward_model_and_reward_model_cells_do() -> None:
    cfg = PipelineConfig()
    other_rm = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, lr=1e-5))
    dpo = dataclasses.replace(cfg.policy, method="dpo")
    assert cell_spec(cfg, dpo) == cell_spec(other_rm, dpo)
    assert cell_spec(cfg, PolicyConfig()) != cell_spec(other_rm, PolicyConfig())  # MADPO reads the reward model


def test_a_cell_stored_before_a_field_existed_matches_while_the_field_is_at_its_default(tmp_path: Path) -> None:
    store, cfg = CellStore(tmp_path), PipelineConfig()
    spec = cell_spec(cfg, PolicyConfig(), source="reward_model")
    old = _drop(spec, "pipeline", "reward", "warm_start")  # written by code that had no reward.warm_start
    store.put(old, {"mean": 2.0}, name="policy-madpo")
    assert store.get(spec)["result"] == {"mean": 2.0}
    warm = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, warm_start="rotten_tomatoes"))
    assert store.get(cell_spec(warm, PolicyConfig(), source="reward_model")) is None  # the field is set: another cell
    # any other difference still refuses, including the versions
    assert not compatible(old, {**spec, "pipeline_version": spec["pipeline_version"] + 1}, default_spec())
    assert not compatible(spec, old, default_spec())  # a stored key the current code lacks is a different cell


@pytest.mark.parametrize("value", [None, 0, "x"])
def test_compatible_needs_the_default_value_exactly(value) -> None:
    assert compatible({"a": 1}, {"a": 1, "b": value}, {"b": value})
    assert not compatible({"a": 1}, {"a": 1, "b": value}, {"b": "other"})
    assert not compatible({"a": 1}, {"a": 1, "b": value}, {})
