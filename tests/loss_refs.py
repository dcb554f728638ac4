"""float64 references for the loss tests, written from the formulas of docs/method.md with ``math`` on Python
floats, never with the library's own functions."""

import math

import torch

TAU = math.log(999.0)
F64 = torch.float64
# implicit margins from deep in one tail of the sigmoid to deep in the other
H = [-300.0, -20.0, -1.5, 0.0, 0.25, 3.0, 40.0, 500.0]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_c(a: float, c_max: float = 4.0, c_min: float | None = None, lam: float = 1.0, tau: float = TAU) -> float:
    """c(|m|) = c_min + (c_max - c_min) / (1 + K exp(lam (|m| - tau))),  K = (c_max - 1) / (1 - c_min)."""
    c_min = 1.0 / c_max if c_min is None else c_min
    k = (c_max - 1.0) / (1.0 - c_min)
    z = lam * (a - tau)
    if z > 700:  # exp overflows; the limit is c_min
        return c_min
    return c_min + (c_max - c_min) / (1.0 + k * math.exp(z))


def ref_w(m: float, c_max: float = 4.0, tau: float = TAU, variant: str = "full", **kw: float) -> float:
    """w(m) = sigma(c m) / sigma(m) for m > -tau, else 1."""
    if m <= -tau:
        return 1.0
    c = ref_c(abs(m), c_max=c_max, tau=tau, **kw)
    if variant == "amp_only":
        c = max(c, 1.0)
    elif variant == "reg_only":
        c = min(c, 1.0)
    return math.exp(log_sigmoid(c * m) - log_sigmoid(m))


def t64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def pairs(h: list[float], dtype: torch.dtype = F64, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Four log-prob tensors whose implicit margin is exactly h: policy chosen = h, the other three are 0."""
    pc = torch.tensor(h, dtype=dtype, requires_grad=requires_grad)
    zeros = torch.zeros(len(h), dtype=dtype)
    return pc, zeros.clone(), zeros.clone(), zeros.clone()


def assert_close(actual: torch.Tensor, expected: list[float], rtol: float = 1e-12, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual.double(), t64(expected), rtol=rtol, atol=atol)
