"""madpo.distributed without a process group: rank 0 of 1, and every collective a no-op (the 2-rank path is
tests/test_scoring.py::test_ddp_two_ranks_shard_gather_and_cache)."""

import madpo.data.datamodule as dm_module
from madpo import distributed


def test_single_process_is_rank_0_of_1(monkeypatch):
    assert not distributed.is_initialized()
    assert distributed.rank_and_world() == (0, 1)
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    ran = []
    with distributed.main_process_first():
        ran.append(1)
    assert ran == [1]
    monkeypatch.setenv("RANK", "3")
    assert distributed.launcher_rank() in (0, 3)  # Lightning's own rank wins when it has set one


def test_old_import_paths_still_work():
    assert dm_module.main_process_first is distributed.main_process_first
    from madpo.data.datamodule import LengthGroupedSampler, length_grouped_order, row_lengths  # noqa: F401
