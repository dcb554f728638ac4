"""What the machine computes fast: `precision: auto` picks bf16 autocast only where the hardware has bf16 arithmetic.

On a CPU without avx512_bf16 or AMX, PyTorch emulates bf16 matmuls by converting to float32 and back, so
`bf16-mixed` there is many times slower than `32-true` (bench/results/precision.md)."""

from __future__ import annotations

import torch

AUTO = "auto"
FAST_BF16 = "bf16-mixed"
FULL = "32-true"


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (avx512_bf16 or AMX tiles), read off PyTorch's CPU probes; False
    where a PyTorch build lacks them."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def uses_gpu(accelerator: str) -> bool:
    """Whether a Trainer with this accelerator trains on a CUDA device."""
    return accelerator in ("gpu", "cuda") or (accelerator == AUTO and torch.cuda.is_available())


def resolve_precision(precision: str, accelerator: str) -> str:
    """`precision` unchanged, except `auto`: `bf16-mixed` on a CUDA device with bf16 or a CPU with native bf16,
    `32-true` elsewhere."""
    if precision != AUTO:
        return precision
    if uses_gpu(accelerator):
        return FAST_BF16 if torch.cuda.is_bf16_supported() else FULL
    return FAST_BF16 if cpu_has_bf16() else FULL


def slow_precision_warning(precision: str, accelerator: str) -> str | None:
    """A sentence for the user when `precision` asks bf16 of a CPU that only emulates it; None otherwise."""
    if "bf16" not in precision or uses_gpu(accelerator) or cpu_has_bf16():
        return None
    return (
        f"trainer.precision {precision} on a CPU without avx512_bf16 or AMX: PyTorch emulates bf16 here, many times "
        "slower than 32-true (bench/results/precision.md); `--trainer.precision auto` picks 32-true on this machine"
    )
