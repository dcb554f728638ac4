"""`precision: auto`: bf16 autocast only where the hardware has bf16 arithmetic; explicit precisions pass through."""

from __future__ import annotations

import pytest
import torch

from madpo import hardware
from madpo.pipeline.run import parse_config


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpu_follows_native_bf16(native, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: native)
    expected = "bf16-mixed" if native else "32-true"
    assert hardware.resolve_precision("auto", "cpu") == expected
    for explicit in ("32-true", "bf16-mixed", "16-mixed"):
        assert hardware.resolve_precision(explicit, "cpu") == explicit


def test_auto_precision_on_gpu_asks_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert hardware.resolve_precision("auto", "auto") == expected
        assert hardware.resolve_precision("auto", "gpu") == expected


def test_cpu_probe_reads_torch(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert hardware.cpu_has_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not hardware.cpu_has_bf16()


@pytest.mark.parametrize("native", [True, False])
def test_pipeline_config_resolves_auto_when_parsed(native, monkeypatch):
    """Stage keys and sweep cells read the parsed config: they must name the precision that ran, never 'auto'."""
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: native)
    cfg = parse_config(["--trainer.accelerator", "cpu", "--trainer.precision", "auto"])
    assert cfg.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert parse_config(["--trainer.precision", "bf16-mixed"]).trainer.precision == "bf16-mixed"


def test_training_settings_resolve_auto(monkeypatch):
    from madpo.pipeline.config import TrainerConfig
    from madpo.pipeline.stages.base import TrainingSettings

    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert TrainingSettings.of(TrainerConfig(accelerator="cpu", precision="auto")).precision == "32-true"


def test_bf16_on_a_cpu_without_it_is_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert "emulates bf16" in hardware.slow_precision_warning("bf16-mixed", "cpu")
    assert hardware.slow_precision_warning("32-true", "cpu") is None
    with caplog.at_level("WARNING", logger="madpo.pipeline"):
        parse_config(["--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed"])
    assert "--trainer.precision auto" in caplog.text
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    assert hardware.slow_precision_warning("bf16-mixed", "cpu") is None
