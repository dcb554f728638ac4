"""madpo.scoring: batched no-grad scoring equals per-pair scoring, order, eval mode, DDP sharding, atomic cache."""

import contextlib
import logging
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.multiprocessing as mp

import madpo.scoring as scoring
from madpo.data import DataRequirements, PreferenceDataModule
from madpo.data.collate import PreferenceCollator
from madpo.data.formats import load_in_memory
from madpo.data.tokenize import tokenize_dataset
from madpo.modeling import init_reward_model, load_causal_lm, load_tokenizer, pair_rewards, sequence_logps
from madpo.scoring import (
    attach_reference_logps,
    attach_rm_margins,
    cache_key,
    cache_path,
    cached_columns,
    data_fingerprint,
    score_margins,
    score_reference_logps,
)

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny-llama")
N = 11


def make_dataset(tok, n=N):
    rows = datasets.Dataset.from_json(str(DATA / "pairs_train.jsonl")).select(range(n))
    # vary the lengths so that sorting by length reorders rows
    rows = rows.map(lambda r, i: {"chosen": r["chosen"] * (1 + i % 3)}, with_indices=True)
    return tokenize_dataset(load_in_memory(rows), tok, max_length=80, max_prompt_length=16)[0]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def ds(tok):
    return make_dataset(tok)


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm(TINY).eval()


@pytest.fixture(scope="module")
def rm(tok):
    torch.manual_seed(0)
    return init_reward_model(TINY, pad_token_id=tok.pad_token_id).eval()


@pytest.fixture(scope="module")
def collator(tok):
    return PreferenceCollator(tok.pad_token_id)


def single(row, completion):
    ids = torch.tensor([row["prompt_ids"] + row[completion]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(row["prompt_ids"]) :] = True
    return ids, torch.ones_like(ids), mask


def test_reference_logps_equal_per_pair_computation(lm, ds, collator):
    chosen, rejected = score_reference_logps(lm, ds, collator, batch_size=4, progress=False)
    assert chosen.shape == rejected.shape == (N,) and chosen.dtype == torch.float32
    with torch.no_grad():
        for i, row in enumerate(ds):
            for got, completion in ((chosen, "chosen_ids"), (rejected, "rejected_ids")):
                want, _ = sequence_logps(lm, *single(row, completion), fast=False)
                torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)


def test_margins_equal_per_pair_computation(rm, ds, collator):
    margins = score_margins(rm, ds, collator, batch_size=3, progress=False)
    assert margins.shape == (N,) and margins.dtype == torch.float32
    with torch.no_grad():
        for i, row in enumerate(ds):
            r_c = pair_rewards(rm, *single(row, "chosen_ids")[:2])
            r_r = pair_rewards(rm, *single(row, "rejected_ids")[:2])
            torch.testing.assert_close(margins[i], (r_c - r_r)[0], rtol=1e-5, atol=1e-5)
    assert margins.std() > 0  # raw, not normalised away


def counted(monkeypatch, name):
    calls = []
    real = getattr(scoring, name)
    monkeypatch.setattr(scoring, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_attach_rm_margins_equals_per_pair_rewards_and_hits_the_cache(rm, tok, ds, collator, tmp_path, monkeypatch):
    calls = counted(monkeypatch, "score_margins")
    args = {"cache_dir": tmp_path, "tokenizer": tok, "max_length": 80, "max_prompt_length": 16, "batch_size": 3}
    with_margin = ds.add_column("rm_margin", [9.0] * N)  # replaced
    stats = {}
    out = attach_rm_margins(with_margin, rm, collator, stats=stats, **args)
    assert out.column_names == [*ds.column_names, "rm_margin"] and len(calls) == 1
    assert stats["cache"] == "miss" and stats["mean"] == pytest.approx(sum(out["rm_margin"]) / N, rel=1e-5)
    with torch.no_grad():
        for i, row in enumerate(ds):
            r_c = pair_rewards(rm, *single(row, "chosen_ids")[:2])
            r_r = pair_rewards(rm, *single(row, "rejected_ids")[:2])
            assert out["rm_margin"][i] == pytest.approx((r_c - r_r)[0].item(), rel=1e-5, abs=1e-5)
    again_stats = {}
    again = attach_rm_margins(ds, rm, collator, stats=again_stats, **args)
    assert len(calls) == 1 and again_stats["cache"] == "hit" and again["rm_margin"] == out["rm_margin"]
    attach_rm_margins(ds, rm, collator, **{**args, "precision": "bf16-mixed"})  # another key part: scored again
    assert len(calls) == 2
    assert len(list(Path(tmp_path).glob("rm_margin-*.safetensors"))) == 2


def test_attach_reference_logps_uses_the_given_fingerprint(lm, tok, ds, collator, tmp_path, monkeypatch):
    calls = counted(monkeypatch, "score_reference_logps")
    args = {"cache_dir": tmp_path, "tokenizer": tok, "max_length": 80, "max_prompt_length": 16, "batch_size": 4}
    stats = {}
    out = attach_reference_logps(ds, lm, collator, model_fingerprint="ref-a", stats=stats, **args)
    chosen, rejected = score_reference_logps(lm, ds, collator, batch_size=4, progress=False)  # not counted
    assert out["ref_chosen_logps"] == chosen.double().tolist()
    assert out["ref_rejected_logps"] == rejected.double().tolist()
    assert stats == {"cache": "miss"} and len(calls) == 1
    attach_reference_logps(ds, lm, collator, model_fingerprint="ref-a", stats=stats, **args)
    assert stats == {"cache": "hit"} and len(calls) == 1
    attach_reference_logps(ds, lm, collator, model_fingerprint="ref-b", **args)
    assert len(calls) == 2


def test_sorting_by_length_keeps_dataset_order(lm, ds, collator):
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in ds]
    assert lengths != sorted(lengths, reverse=True)  # the sort really reorders
    sorted_c, sorted_r = score_reference_logps(lm, ds, collator, batch_size=2, progress=False)
    plain_c, plain_r = score_reference_logps(lm, ds, collator, batch_size=2, sort_by_length=False, progress=False)
    torch.testing.assert_close(sorted_c, plain_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sorted_r, plain_r, rtol=1e-5, atol=1e-5)


def test_eval_mode_no_grad_forward_context_and_mode_restored(rm, ds, collator):
    modes = []  # (training, grad enabled) seen by the backbone during scoring
    handle = rm.model.register_forward_pre_hook(lambda m, a: modes.append((m.training, torch.is_grad_enabled())))
    entered = []

    @contextlib.contextmanager
    def forward_context():
        entered.append(1)
        yield

    rm.train()
    try:
        score_margins(rm, ds, collator, batch_size=4, forward_context=forward_context, progress=False)
        assert rm.training  # the caller's mode is restored
    finally:
        handle.remove()
        rm.eval()
    assert len(entered) == 3  # ceil(11 / 4) forwards, each inside the context
    assert modes and all(mode == (False, False) for mode in modes)


def test_sft_dataset_is_refused(lm, tok, collator):
    sft = tokenize_dataset(
        load_in_memory(datasets.Dataset.from_list([{"prompt": "a", "completion": " b"}])), tok, max_length=8
    )[0]
    with pytest.raises(ValueError, match="missing \\['rejected_ids'\\]"):
        score_reference_logps(lm, sft, collator, batch_size=2)


def test_data_fingerprint_is_content_based(tok, ds):
    assert data_fingerprint(ds) == data_fingerprint(make_dataset(tok))
    assert data_fingerprint(ds) != data_fingerprint(ds.select(range(N - 1)))
    assert data_fingerprint(ds) != data_fingerprint(ds.select([1, 0, *range(2, N)]))
    changed = ds.map(
        lambda r, i: {"rejected_ids": r["rejected_ids"][:-1] if i == 5 else r["rejected_ids"]}, with_indices=True
    )
    assert data_fingerprint(ds) != data_fingerprint(changed)


def test_cache_hit_and_key_parts(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"rm_margin": torch.arange(4, dtype=torch.float32)}

    parts = {"data": "d", "model": "m", "tokenizer": "t", "max_length": 8}
    first, hit = cached_columns(tmp_path, "rm_margin", parts, compute, num_rows=4)
    second, hit2 = cached_columns(tmp_path, "rm_margin", parts, compute, num_rows=4)
    assert (hit, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first["rm_margin"], second["rm_margin"])
    for changed in ({"model": "m2"}, {"tokenizer": "t2"}, {"max_length": 9}, {"data": "d2"}):
        assert cache_key("rm_margin", {**parts, **changed}) != cache_key("rm_margin", parts)
    assert cache_key("ref_logps", parts) != cache_key("rm_margin", parts)
    cached_columns(tmp_path, "rm_margin", {**parts, "max_length": 9}, compute)
    assert len(calls) == 2


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a safetensors file")
        raise OSError("disk full")

    monkeypatch.setattr(scoring, "save_file", failing_save_file)
    parts = {"data": "d"}
    with pytest.raises(OSError, match="disk full"):
        cached_columns(tmp_path, "rm_margin", parts, lambda: {"rm_margin": torch.ones(3)})
    assert not cache_path(tmp_path, "rm_margin", parts).exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too
    monkeypatch.undo()
    _, hit = cached_columns(tmp_path, "rm_margin", parts, lambda: {"rm_margin": torch.ones(3)})
    assert not hit and [p.name for p in tmp_path.iterdir()] == [cache_path(tmp_path, "rm_margin", parts).name]


def test_corrupt_or_wrong_sized_cache_is_a_loud_miss(tmp_path, caplog):
    parts = {"data": "d"}
    cache_path(tmp_path, "rm_margin", parts).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        out, hit = cached_columns(tmp_path, "rm_margin", parts, lambda: {"rm_margin": torch.ones(3)}, num_rows=3)
    assert not hit and "unreadable" in caplog.text
    _, hit = cached_columns(tmp_path, "rm_margin", parts, lambda: {"rm_margin": torch.ones(4)}, num_rows=4)
    assert not hit


def _ddp_worker(rank, world, tmp):
    """One rank: score + cache, then a datamodule setup that needs reference log-probs. Runs in this process (rank 0)
    and in one spawned process (rank 1): a single extra interpreter keeps the test affordable on 2 cores."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    hf_cache = datasets.config.HF_DATASETS_CACHE
    torch.set_num_threads(1)
    try:
        tok = load_tokenizer(TINY)
        ds = make_dataset(tok)
        lm = load_causal_lm(TINY)

        def compute():
            c, r = score_reference_logps(lm, ds, PreferenceCollator(tok.pad_token_id), batch_size=2)
            return {"ref_chosen_logps": c, "ref_rejected_logps": r}

        out, hit = cached_columns(f"{tmp}/cache", "ref_logps", {"data": data_fingerprint(ds)}, compute)
        files = len(list(Path(f"{tmp}/cache").iterdir()))
        # the datamodule under DDP: files tokenized main-process-first, reference log-probs sharded and cached once
        datasets.config.HF_DATASETS_CACHE = f"{tmp}/hf"
        dm = PreferenceDataModule(train_files=str(DATA / "pairs_val.jsonl"), tokenizer=TINY, cache_dir=f"{tmp}/dm")

        @contextlib.contextmanager
        def reference_model():
            yield lm

        module = SimpleNamespace(
            data_requirements=lambda: DataRequirements(reference_logps=True), reference_model=reference_model
        )
        dm.trainer = SimpleNamespace(
            lightning_module=module,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
            precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext, precision="32-true"),
        )
        dm.setup("fit")
        dm_logps = torch.tensor(dm.train_dataset["ref_chosen_logps"])
        torch.save({"out": out, "hit": hit, "files": files, "dm": dm_logps}, f"{tmp}/rank{rank}.pt")
    finally:
        datasets.config.HF_DATASETS_CACHE = hf_cache
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_shard_gather_and_cache(tmp_path, lm, ds, collator):
    other = mp.get_context("spawn").Process(target=_ddp_worker, args=(1, 2, str(tmp_path)))
    other.start()
    try:
        _ddp_worker(0, 2, str(tmp_path))
    finally:
        other.join(timeout=120)
        if other.is_alive():
            other.kill()
    assert other.exitcode == 0
    chosen, rejected = score_reference_logps(lm, ds, collator, batch_size=2, progress=False)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for result in results:  # every rank holds the full result, in dataset order
        assert not result["hit"] and result["files"] == 1
        torch.testing.assert_close(result["out"]["ref_chosen_logps"], chosen, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["out"]["ref_rejected_logps"], rejected, rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # written once, by rank 0
    assert results[0]["dm"].shape == (64,) and torch.equal(results[0]["dm"], results[1]["dm"])
    assert len(list((tmp_path / "dm").iterdir())) == 1


def test_interrupted_scoring_resumes_from_finished_chunks(tmp_path, lm, ds, collator, monkeypatch):
    """A pass killed after its first chunk recomputes only the rest; the finished result equals a clean pass."""
    import madpo.scoring as scoring

    clean = scoring.score_reference_logps(lm, ds, collator, batch_size=4, progress=False)
    calls = {"n": 0}
    real_fn = scoring._logps_fn

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process dies in the second chunk
        return real_fn(model, batch)

    monkeypatch.setattr(scoring, "_logps_fn", dying)
    parts = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        scoring._score(
            lm,
            ds,
            collator,
            scoring._logps_fn,
            width=2,
            batch_size=4,
            device=None,
            forward_context=None,
            sort_by_length=True,
            progress=False,
            desc="t",
            resume_dir=parts,
            chunk_pairs=8,
        )
    assert len(list(parts.glob("*.safetensors"))) == 1  # the first chunk (8 pairs, 2 batches) is on disk
    counted = {"n": 0}

    def counting(model, batch):
        counted["n"] += 1
        return real_fn(model, batch)

    monkeypatch.setattr(scoring, "_logps_fn", counting)
    out = scoring._score(
        lm,
        ds,
        collator,
        scoring._logps_fn,
        width=2,
        batch_size=4,
        device=None,
        forward_context=None,
        sort_by_length=True,
        progress=False,
        desc="t",
        resume_dir=parts,
        chunk_pairs=8,
    )
    n_batches_total = -(-len(ds) // 4)
    assert counted["n"] == n_batches_total - 2  # the finished chunk was not recomputed
    torch.testing.assert_close(out[:, 0], clean[0])
    torch.testing.assert_close(out[:, 1], clean[1])
