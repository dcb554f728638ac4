"""Tests for madpo/losses.py.

Expected values are computed here from the formulas of docs/method.md with ``math`` on Python floats
(float64), never with the library's own functions.
"""

import copy
import math
import statistics

import pytest
import torch

from madpo.losses import (
    BetaDPO,
    amplification_coefficient,
    bradley_terry_losses,
    cdpo_losses,
    chosen_nll,
    dpo_losses,
    hinge_losses,
    implicit_margin,
    ipo_losses,
    madpo_losses,
    madpo_losses_and_weights,
    madpo_weights,
    margin_target_losses,
    odpo_losses,
    rdpo_losses,
    weighted,
)

TAU = math.log(999.0)
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# float64 references written from the formulas


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


# ---------------------------------------------------------------------------------------------------------------------
# eq. (2)


def test_implicit_margin_hand_values() -> None:
    pc, pr, rc, rr = t64([-10.0, -3.5]), t64([-12.0, -2.0]), t64([-11.0, -4.0]), t64([-11.5, -1.0])
    # h = (pc - rc) - (pr - rr)
    assert_close(implicit_margin(pc, pr, rc, rr), [(-10 + 11) - (-12 + 11.5), (-3.5 + 4) - (-2 + 1)])


# ---------------------------------------------------------------------------------------------------------------------
# eq. (14)–(15): c(|m|)


@pytest.mark.parametrize("c_max,tau,lam", [(4.0, TAU, 1.0), (2.0, TAU, 1.0), (3.0, 2.0, 0.5), (4.0, 10.0, 2.0)])
def test_c_is_one_at_tau(c_max: float, tau: float, lam: float) -> None:
    c = amplification_coefficient(t64([tau]), c_max=c_max, lam=lam, tau=tau)
    assert c.item() == pytest.approx(1.0, abs=1e-14)


def test_c_hand_values_and_monotone() -> None:
    a = [0.0, 0.5, 1.5, 3.0, TAU, 8.0, 12.0]
    c = amplification_coefficient(t64(a))
    assert_close(c, [ref_c(x) for x in a])
    assert c[0].item() == pytest.approx(4.0, abs=0.02)  # c(0) ~ c_max when lam * tau is large
    assert torch.all(c[1:] < c[:-1])  # decreasing in |m|
    # explicit c_min and lam
    assert_close(
        amplification_coefficient(t64(a), c_max=3.0, c_min=0.5, lam=0.7, tau=4.0),
        [ref_c(x, c_max=3.0, c_min=0.5, lam=0.7, tau=4.0) for x in a],
    )


def test_c_tends_to_c_min() -> None:
    c = amplification_coefficient(t64([30.0, 100.0, 1e3, 1e6]), c_max=4.0)
    assert torch.isfinite(c).all()
    assert c[0].item() == pytest.approx(0.25, abs=1e-9)
    assert torch.all(c[1:] == 0.25)  # exp overflows to inf: exactly c_min, no NaN
    c32 = amplification_coefficient(torch.tensor([200.0, 1e30]), c_max=2.0)
    assert torch.equal(c32, torch.tensor([0.5, 0.5]))


# ---------------------------------------------------------------------------------------------------------------------
# eq. (16)–(18): w(m)


GRID = [-50.0, -TAU - 1.0, -TAU, -6.0, -3.0, -1.0, -0.1, 0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 6.0, 7.0, 10.0, 30.0]


def test_weights_hand_values() -> None:
    assert_close(madpo_weights(t64(GRID)), [ref_w(m) for m in GRID])
    assert_close(madpo_weights(t64(GRID), c_max=2.0), [ref_w(m, c_max=2.0) for m in GRID])
    assert_close(
        madpo_weights(t64(GRID), c_max=3.0, c_min=0.6, lam=0.5, tau=4.0),
        [ref_w(m, c_max=3.0, c_min=0.6, lam=0.5, tau=4.0) for m in GRID],
    )


def test_weight_is_one_at_zero() -> None:
    for c_max in (2.0, 3.0, 4.0):
        assert madpo_weights(t64([0.0]), c_max=c_max).item() == 1.0


def test_weight_continuous_at_minus_tau() -> None:
    w = madpo_weights(t64([-TAU + 1e-6, -TAU + 1e-3, -TAU, -TAU - 1e-6, -20.0, -1e4]))
    assert abs(w[0].item() - 1.0) < 1e-5
    assert abs(w[1].item() - 1.0) < 1e-2
    assert torch.all(w[2:] == 1.0)  # the cap: w = 1 for m <= -tau


def test_weight_regions() -> None:
    amplify = torch.linspace(0.01, TAU - 0.01, 200, dtype=F64)  # 0 < m < tau: w > 1
    noisy = torch.linspace(-TAU + 0.01, -0.01, 200, dtype=F64)  # -tau < m < 0: w < 1
    easy = torch.linspace(TAU + 0.01, 40.0, 200, dtype=F64)  # m > tau: w < 1
    assert torch.all(madpo_weights(amplify) > 1)
    assert torch.all(madpo_weights(noisy) < 1)
    assert torch.all(madpo_weights(easy) < 1)
    assert madpo_weights(t64([-1.0])).item() < 0.2  # "often << 1"


def test_weight_tends_to_one_and_is_bounded() -> None:
    w = madpo_weights(t64([10.0, 20.0, 50.0, 200.0]))
    gaps = (1 - w).tolist()
    assert all(g > 0 for g in gaps[:3]) and gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-12
    # bounded: sigma(c m) <= 1 and sigma(m) >= 1/2 for m >= 0, and w < 1 for m < 0
    m = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.tensor([-1e30, 1e30, 0.05, 0.3])])
    for c_max in (2.0, 4.0, 10.0):
        w32 = madpo_weights(m, c_max=c_max)
        assert torch.isfinite(w32).all() and torch.all(w32 <= 2.0) and torch.all(w32 > 0)


def test_amp_only_and_reg_only_regions() -> None:
    m = torch.cat([torch.linspace(-20.0, 40.0, 601, dtype=F64), t64([TAU, -TAU])])
    full = madpo_weights(m)
    amp = madpo_weights(m, variant="amp_only")
    reg = madpo_weights(m, variant="reg_only")
    easy = m > TAU
    assert torch.equal(amp[~easy], full[~easy])  # amp_only == full except m > tau ...
    assert torch.all(amp[easy] == 1.0)  # ... where it is 1 (c_eff = max(c, 1) = 1)
    assert torch.all(reg[~easy] == 1.0)  # reg_only == 1 (DPO) except m > tau ...
    assert torch.equal(reg[easy], full[easy])  # ... where it dampens like full MADPO
    assert torch.all(reg[easy] < 1.0)
    pts = [-3.0, 1.0, 8.0, 15.0]
    assert_close(
        madpo_weights(t64(pts), variant="amp_only", c_max=2.0), [ref_w(x, c_max=2.0, variant="amp_only") for x in pts]
    )
    assert_close(
        madpo_weights(t64(pts), variant="reg_only", c_max=2.0), [ref_w(x, c_max=2.0, variant="reg_only") for x in pts]
    )


@pytest.mark.parametrize("variant", ["full", "amp_only", "reg_only", "no_downweight", "no_amplify"])
def test_c_max_one_gives_exact_ones(variant: str) -> None:
    m = torch.tensor([-100.0, -TAU, -1.0, 0.0, 0.5, 7.0, 1e6])
    w = madpo_weights(m, c_max=1.0, variant=variant)
    assert w.dtype == torch.float32 and torch.equal(w, torch.ones(7))
    assert torch.equal(amplification_coefficient(m.abs(), c_max=1.0), torch.ones(7))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"c_max": 4.0, "c_min": 1.0}, "c_min"),
        ({"c_max": 4.0, "c_min": 1.5}, "c_min"),
        ({"c_max": 4.0, "c_min": 0.0}, "c_min"),
        ({"c_max": 0.5}, "c_max"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"lam": 0.0}, "lam"),
        ({"variant": "amplify"}, "variant.*amplify"),
    ],
)
def test_invalid_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        madpo_weights(t64([0.5, 1.0]), **kwargs)


def test_weights_dtype_and_no_grad() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        m = torch.tensor([-8.0, -1.0, 0.5, 2.0, 9.0], dtype=dtype, requires_grad=True)
        w = madpo_weights(m)
        assert w.dtype == torch.float32 and not w.requires_grad and w.grad_fn is None
        # computed in float32 on the (rounded) input: matches the float64 formula to float32 precision
        assert_close(w, [ref_w(x) for x in m.detach().double().tolist()], rtol=1e-5, atol=1e-6)
    m64 = t64([0.5, -1.0]).requires_grad_()
    assert madpo_weights(m64).dtype == F64 and not madpo_weights(m64).requires_grad


def test_nan_margin_is_not_silently_capped() -> None:
    w = madpo_weights(torch.tensor([float("nan"), 1.0]))
    assert math.isnan(w[0].item()) and math.isfinite(w[1].item())


# ---------------------------------------------------------------------------------------------------------------------
# losses: DPO, IPO, MADPO, Bradley-Terry


H = [-300.0, -20.0, -1.5, 0.0, 0.25, 3.0, 40.0, 500.0]


def test_dpo_hand_values() -> None:
    for beta in (0.1, 0.5):
        assert_close(dpo_losses(*pairs(H), beta=beta), [-log_sigmoid(beta * h) for h in H])
    pc, pr, rc, rr = t64([-5.0, -7.0]), t64([-6.0, -4.0]), t64([-5.5, -6.0]), t64([-6.5, -5.0])
    h = [(-5.0 + 5.5) - (-6.0 + 6.5), (-7.0 + 6.0) - (-4.0 + 5.0)]
    assert_close(dpo_losses(pc, pr, rc, rr), [math.log1p(math.exp(-0.1 * x)) for x in h])


def test_ipo_hand_values() -> None:
    for beta in (0.1, 0.25):
        assert_close(ipo_losses(*pairs(H), beta=beta), [(h - 1 / (2 * beta)) ** 2 for h in H])
    assert ipo_losses(*pairs([5.0]), beta=0.1).item() == 0.0  # target 1 / (2 * 0.1) = 5


def test_bradley_terry_hand_values() -> None:
    rc, rr = t64([1.0, -2.0, 0.5, 30.0]), t64([0.0, 1.0, 0.5, -30.0])
    d = [1.0, -3.0, 0.0, 60.0]
    assert_close(bradley_terry_losses(rc, rr), [-log_sigmoid(x) for x in d])
    assert_close(bradley_terry_losses(rc, rr, target_margin=0.5), [-log_sigmoid(x - 0.5) for x in d])
    tm = [0.0, 1.0, -1.0, 2.0]
    assert_close(
        bradley_terry_losses(rc, rr, target_margin=t64(tm)), [-log_sigmoid(x - t) for x, t in zip(d, tm, strict=True)]
    )
    assert bradley_terry_losses(t64([0.0]), t64([0.0])).item() == pytest.approx(math.log(2.0), abs=1e-15)


def test_madpo_hand_values() -> None:
    h = [-20.0, -1.5, 0.0, 3.0, 15.0, 40.0]
    m = [0.5, -2.0, 1.0, -8.0, 9.0, 3.0]
    losses, weights = madpo_losses_and_weights(*pairs(h), t64(m), beta=0.1)
    assert_close(weights, [ref_w(x) for x in m])
    assert_close(losses, [ref_w(x) * -log_sigmoid(0.1 * y) for x, y in zip(m, h, strict=True)])
    assert not weights.requires_grad
    assert torch.equal(madpo_losses(*pairs(h), t64(m), beta=0.1), losses)
    # the batch loss is the plain mean of w_i * l_i (not divided by sum(w))
    expected_mean = sum(ref_w(x) * -log_sigmoid(0.1 * y) for x, y in zip(m, h, strict=True)) / len(h)
    assert losses.mean().item() == pytest.approx(expected_mean, rel=1e-12)
    losses_c2 = madpo_losses(*pairs(h), t64(m), beta=0.2, c_max=2.0, variant="amp_only")
    assert_close(
        losses_c2, [ref_w(x, c_max=2.0, variant="amp_only") * -log_sigmoid(0.2 * y) for x, y in zip(m, h, strict=True)]
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_madpo_with_unit_weights_equals_dpo_in_value_and_gradient(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logps = [(torch.randn(16, generator=gen, dtype=dtype) * 20 - 100).requires_grad_() for _ in range(2)]
    refs = [torch.randn(16, generator=gen, dtype=dtype) * 20 - 100 for _ in range(2)]
    margins = torch.randn(16, generator=gen, dtype=dtype) * 5

    dpo = dpo_losses(logps[0], logps[1], refs[0], refs[1], beta=0.1)
    dpo_grads = torch.autograd.grad(dpo.mean(), logps)
    madpo = madpo_losses(logps[0], logps[1], refs[0], refs[1], margins, beta=0.1, c_max=1.0)
    madpo_grads = torch.autograd.grad(madpo.mean(), logps)
    assert madpo.dtype == dtype
    assert torch.equal(madpo, dpo)
    for g_madpo, g_dpo in zip(madpo_grads, dpo_grads, strict=True):
        assert torch.equal(g_madpo, g_dpo)


def test_madpo_gradient_is_weighted_dpo_gradient() -> None:
    h, m = [-2.0, 0.5, 4.0], [1.0, -1.0, 9.0]
    pc, pr, rc, rr = pairs(h, requires_grad=True)
    madpo_losses(*(pc, pr, rc, rr), t64(m), beta=0.1).sum().backward()
    # d/dh [-w log sigma(beta h)] = -w beta sigma(-beta h)
    assert_close(pc.grad, [-ref_w(x) * 0.1 * sigmoid(-0.1 * y) for x, y in zip(m, h, strict=True)])


def _bad_shape_calls() -> list:
    b, b1 = torch.zeros(4), torch.zeros(4, 1)
    return [
        lambda: implicit_margin(b, b1, b, b),
        lambda: dpo_losses(b1, b, b, b),
        lambda: ipo_losses(b, b, b, b1),
        lambda: dpo_losses(b1, b1, b1, b1),  # consistent but not (B,)
        lambda: madpo_losses(b, b, b, b, b1),
        lambda: madpo_losses(b, b, b, b, torch.zeros(3)),
        lambda: madpo_weights(b1),
        lambda: bradley_terry_losses(b, b1),
        lambda: bradley_terry_losses(b, b, target_margin=b1),
        lambda: BetaDPO()(b, b, b, b1),
    ]


@pytest.mark.parametrize("call", _bad_shape_calls())
def test_shape_mismatch_raises(call) -> None:
    with pytest.raises(ValueError, match=r"\[4, 1\]|\[3\]"):
        call()


@pytest.mark.parametrize("fn", [dpo_losses, ipo_losses])
def test_beta_must_be_positive(fn) -> None:
    with pytest.raises(ValueError, match="beta"):
        fn(*pairs([1.0]), beta=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# eq. (20): effective target margin beta h* = c(|m|) m


@pytest.mark.parametrize("m", [1.5, 0.3, -2.0, 5.0, 6.5])
def test_effective_target_margin(m: float) -> None:
    w_pos, w_neg = madpo_weights(t64([m, -m])).tolist()
    a, b = sigmoid(m) * w_pos, sigmoid(-m) * w_neg  # f(x) = a (-log sigma(x)) + b (-log sigma(-x)),  x = beta h
    x = 0.0
    for _ in range(100):  # Newton on the convex f: f'(x) = (a + b) sigma(x) - a, f''(x) = (a + b) sigma(x) sigma(-x)
        step = ((a + b) * sigmoid(x) - a) / ((a + b) * sigmoid(x) * sigmoid(-x))
        x -= step
        if abs(step) < 1e-13:
            break
    assert x == pytest.approx(ref_c(abs(m)) * m, rel=1e-9, abs=1e-12)

    # and the grid confirms it is the minimiser of the loss itself
    def f(v: float) -> float:
        return -a * log_sigmoid(v) - b * log_sigmoid(-v)

    assert all(f(x) <= f(x + d) for d in (-1e-2, -1e-4, 1e-4, 1e-2))


# ---------------------------------------------------------------------------------------------------------------------
# eq. (7)–(12): beta-DPO

A1 = [1.0, 2.0, -0.5, 3.0, 0.25, -1.5, 2.5, 0.0]
A2 = [4.0, 3.5, 2.0, 5.0, 1.0, 3.0, 6.0, 2.5]


def expected_beta_dpo(
    a: list[float], mask: list[bool], mu: float, beta0: float = 0.1, alpha: float = 0.6, min_beta: float = 1e-3
) -> tuple[float, list[float]]:
    """beta = max(min_beta, beta0 (1 + alpha (mean_kept A - mu))); l_i = mask_i (N / N_kept) (-log sigma(beta h_i))."""
    kept = [x for x, k in zip(a, mask, strict=True) if k]
    beta = max(min_beta, beta0 * (1 + alpha * (sum(kept) / len(kept) - mu)))
    return beta, [(len(a) / len(kept)) * -log_sigmoid(beta * x) if k else 0.0 for x, k in zip(a, mask, strict=True)]


def test_beta_dpo_ema_after_one_and_two_steps() -> None:
    mod = BetaDPO(beta=0.1, alpha=0.6, rho=0.2, momentum=0.9)
    out1 = mod(*pairs(A1))
    mu1 = 0.1 * statistics.fmean(A1)  # EMAs start at 0 and are updated before use
    s1 = 0.1 * statistics.stdev(A1)  # unbiased std
    assert out1.gap_mean.item() == pytest.approx(mu1, rel=1e-6)
    assert out1.gap_std.item() == pytest.approx(s1, rel=1e-6)
    assert mod.gap_mean.item() == pytest.approx(mu1, rel=1e-6) and int(mod.step) == 1
    mask1 = out1.mask.tolist()
    assert sum(mask1) == int(8 * (1 - 0.2)) == 6 and out1.kept_fraction.item() == 6 / 8
    beta1, losses1 = expected_beta_dpo(A1, mask1, mu1)
    assert out1.beta.item() == pytest.approx(beta1, rel=1e-6)
    assert_close(out1.losses, losses1, rtol=1e-6, atol=1e-9)

    out2 = mod(*pairs(A2))
    mu2 = 0.9 * mu1 + 0.1 * statistics.fmean(A2)
    s2 = 0.9 * s1 + 0.1 * statistics.stdev(A2)
    assert out2.gap_mean.item() == pytest.approx(mu2, rel=1e-6)
    assert out2.gap_std.item() == pytest.approx(s2, rel=1e-6)
    assert int(mod.step) == 2
    beta2, losses2 = expected_beta_dpo(A2, out2.mask.tolist(), mu2)
    assert out2.beta.item() == pytest.approx(beta2, rel=1e-6)
    assert_close(out2.losses, losses2, rtol=1e-6, atol=1e-9)
    assert not out2.beta.requires_grad


def test_beta_dpo_clamps_beta_at_min_beta() -> None:
    a = [-10.0, -10.5, -9.5, -10.0, -11.0, -9.0, -10.25, -9.75]  # mean_kept ~ -10, mu ~ -1: 1 + 0.6 * (-9) < 0
    out = BetaDPO(min_beta=1e-3)(*pairs(a))
    assert out.beta.item() == 1e-3
    _, losses = expected_beta_dpo(a, out.mask.tolist(), 0.1 * statistics.fmean(a))
    assert_close(out.losses, losses, rtol=1e-6, atol=1e-9)


def test_beta_dpo_uniform_mask_when_std_is_zero() -> None:
    # policy == reference at init: A == 0, so mu = s = 0 and the Gaussian filter would be 0/0
    mod = BetaDPO()
    n, counts = 10, torch.zeros(10)
    for _ in range(200):
        out = mod(*pairs([0.0] * n))
        assert torch.isfinite(out.losses).all() and out.gap_std.item() == 0.0
        assert out.beta.item() == pytest.approx(0.1, abs=1e-12)  # mean_kept(A) - mu = 0
        assert int(out.mask.sum()) == 8
        assert_close(out.losses, [(10 / 8) * math.log(2.0) if k else 0.0 for k in out.mask.tolist()])
        counts += out.mask
    freq = counts / 200  # every pair equally likely to be kept: 0.8 each (binomial sd ~0.03)
    assert torch.all((freq > 0.65) & (freq < 0.95)), freq
    # constant non-zero A: s = 0.1 * std = 0 as well
    out = BetaDPO()(*pairs([2.0] * 6))
    assert out.gap_std.item() == 0.0 and torch.isfinite(out.losses).all() and int(out.mask.sum()) == 4


def test_beta_dpo_filter_prefers_central_gaps() -> None:
    # after many steps on the same batch the EMAs approach mean/std; an outlier gap is then filtered out
    mod = BetaDPO(rho=0.2)
    a = [0.0, 0.1, -0.1, 0.05, -0.05, 0.2, -0.2, 0.15, -0.15, 50.0]
    for _ in range(60):
        out = mod(*pairs(a))
    assert not out.mask[-1]


@pytest.mark.parametrize("n,rho", [(1, 0.2), (5, 0.2), (10, 0.2), (32, 0.2), (33, 0.5), (7, 0.0), (4, 0.9)])
def test_beta_dpo_kept_count(n: int, rho: float) -> None:
    a = [0.3 * i - 1.0 for i in range(n)]
    out = BetaDPO(rho=rho)(*pairs(a))
    n_kept = max(1, int(n * (1 - rho)))
    assert int(out.mask.sum()) == n_kept and out.mask.dtype == torch.bool and out.mask.shape == (n,)
    assert out.kept_fraction.item() == pytest.approx(n_kept / n)
    assert torch.isfinite(out.losses).all()


def test_beta_dpo_reduction_convention() -> None:
    h = [-3.0, 2.0, 0.5, 7.0, -1.0, 4.0, 1.5, 0.0, 2.5, -0.5]
    pc, pr, rc, rr = pairs(h, requires_grad=True)
    mod = BetaDPO()
    mod(*pairs([1.0, -1.0, 0.5, 2.0, 0.0, 1.0, 3.0, -2.0, 0.5, 1.5]))  # warm the EMAs so the filter is not uniform
    out = mod(pc, pr, rc, rr)
    beta, kept = out.beta.item(), [x for x, k in zip(h, out.mask.tolist(), strict=True) if k]
    expected = sum(-log_sigmoid(beta * x) for x in kept) / len(kept)
    assert out.losses.mean().item() == pytest.approx(expected, rel=1e-12)
    out.losses.mean().backward()
    # gradient: mean over kept of -beta sigma(-beta h_i); zero on filtered pairs; beta is detached
    assert_close(
        pc.grad,
        [-beta * sigmoid(-beta * x) / len(kept) if k else 0.0 for x, k in zip(h, out.mask.tolist(), strict=True)],
    )


def test_beta_dpo_eval_does_not_change_buffers() -> None:
    mod = BetaDPO()
    mod(*pairs(A1))
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    mod.eval()
    out_a = mod(*pairs(A2))
    out_b = mod(*pairs(A2))
    for k, v in mod.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert out_a.gap_mean.item() == before["gap_mean"].item()  # eval only reads the EMAs
    assert torch.equal(out_a.mask, out_b.mask) and torch.equal(out_a.losses, out_b.losses)
    beta, losses = expected_beta_dpo(A2, out_a.mask.tolist(), before["gap_mean"].item())
    assert out_a.beta.item() == pytest.approx(beta, rel=1e-6)
    mod.train()
    mod(*pairs(A2))
    assert int(mod.step) == 2


def test_beta_dpo_state_dict_round_trip_reproduces_next_step() -> None:
    mod = BetaDPO(seed=3)
    mod(*pairs(A1))
    sd = mod.state_dict()
    assert {"gap_mean", "gap_std", "step"} <= set(sd)
    assert sd["step"].dtype == torch.int64 and int(sd["step"]) == 1
    resumed = BetaDPO(seed=3)
    resumed.load_state_dict(copy.deepcopy(sd))
    out, out_resumed = mod(*pairs(A2)), resumed(*pairs(A2))
    for field in ("losses", "mask", "beta", "gap_mean", "gap_std", "kept_fraction"):
        assert torch.equal(getattr(out, field), getattr(out_resumed, field)), field


def test_beta_dpo_mask_depends_on_seed_and_step() -> None:
    a = [0.0] * 64  # uniform filter, so the draw is all randomness (C(64, 51) possible masks)
    mod = BetaDPO(seed=0)
    m0 = mod(*pairs(a)).mask
    assert torch.equal(m0, BetaDPO(seed=0)(*pairs(a)).mask)  # same (seed, step): same mask
    assert not torch.equal(m0, BetaDPO(seed=1)(*pairs(a)).mask)  # another seed
    assert not torch.equal(m0, mod(*pairs(a)).mask)  # the next step


def test_beta_dpo_two_ranks_match_single_process() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(12, generator=gen, dtype=F64) * 3).tolist() for _ in range(3)]
    single = BetaDPO(seed=7)
    ranks = [copy.deepcopy(single), copy.deepcopy(single)]
    for h in batches:
        pc, pr, rc, rr = pairs(h, requires_grad=True)
        out = single(pc, pr, rc, rr)
        out.losses.mean().backward()
        grad_single = pc.grad.clone()

        pc.grad = None
        global_a = pc.detach().clone()

        def all_gather(local: torch.Tensor, global_a: torch.Tensor = global_a) -> torch.Tensor:
            assert local.shape == (6,) and not local.requires_grad
            return global_a

        outs = [
            mod(
                pc[r * 6 : (r + 1) * 6],
                pr[r * 6 : (r + 1) * 6],
                rc[r * 6 : (r + 1) * 6],
                rr[r * 6 : (r + 1) * 6],
                all_gather=all_gather,
                rank=r,
            )
            for r, mod in enumerate(ranks)
        ]
        assert torch.equal(outs[0].beta, outs[1].beta) and torch.equal(outs[0].beta, out.beta)
        assert torch.equal(torch.cat([o.mask for o in outs]), out.mask)
        assert outs[0].losses.shape == (6,)
        ddp_loss = (outs[0].losses.mean() + outs[1].losses.mean()) / 2  # DDP averages the per-rank means
        assert ddp_loss.item() == pytest.approx(out.losses.mean().item(), rel=1e-12)
        ddp_loss.backward()
        torch.testing.assert_close(pc.grad, grad_single, rtol=1e-12, atol=1e-15)
    for mod in ranks:
        for k, v in single.state_dict().items():
            assert torch.equal(mod.state_dict()[k], v)


def test_beta_dpo_bad_gather_or_rank_raises() -> None:
    h = pairs([0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="all_gather"):
        BetaDPO()(*h, all_gather=lambda t: torch.zeros(6))
    with pytest.raises(ValueError, match="rank"):
        BetaDPO()(*h, all_gather=lambda t: torch.cat([t, t]), rank=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rho": 1.0}, "rho"),
        ({"rho": -0.1}, "rho"),
        ({"momentum": 1.0}, "momentum"),
        ({"beta": 0.0}, "beta"),
        ({"min_beta": 0.0}, "min_beta"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_beta_dpo_invalid_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BetaDPO(**kwargs)


def test_beta_dpo_low_precision_inputs() -> None:
    out = BetaDPO()(*pairs([1.0, -2.0, 0.5, 3.0], dtype=torch.bfloat16))
    assert out.losses.dtype == torch.float32 and out.beta.dtype == torch.float32
    assert torch.isfinite(out.losses).all()


def test_decomposition_variants_clip_the_full_weight() -> None:
    pts = [-8.0, -5.0, -2.0, -0.5, 0.0, 0.3, 1.0, 3.0, 6.0, 8.0, 20.0]
    full = [ref_w(x) for x in pts]
    no_down = madpo_weights(t64(pts), variant="no_downweight")
    no_amp = madpo_weights(t64(pts), variant="no_amplify")
    torch.testing.assert_close(no_down, t64([max(w, 1.0) for w in full]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(no_amp, t64([min(w, 1.0) for w in full]), rtol=1e-12, atol=1e-12)
    # each keeps exactly one of the two effects: amplification on (0, tau), down-weighting on (-tau, 0)
    assert no_down[pts.index(1.0)] > 1 and no_down[pts.index(-2.0)] == 1
    assert no_amp[pts.index(1.0)] == 1 and no_amp[pts.index(-2.0)] < 1


def test_beta_dpo_order_key_makes_the_mask_independent_of_rank_layout() -> None:
    """Pairs spread over 2 ranks (interleaved, as a DistributedSampler does) draw what one process draws."""
    torch.manual_seed(3)
    n = 8
    pc, pr, rc, rr = (torch.randn(n, dtype=torch.float64) for _ in range(4))
    keys = torch.arange(n)
    single = BetaDPO(rho=0.5)
    single.gap_std.fill_(0.5)
    out_single = single(pc, pr, rc, rr, order_key=keys)
    layout = [torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])]  # rank r holds the pairs layout[r]
    gathered_rows = torch.cat(layout)
    gaps = implicit_margin(pc, pr, rc, rr)

    def gather(x: torch.Tensor) -> torch.Tensor:  # what all_gather returns on every rank, in rank order
        return gathered_rows.clone() if x.dtype == torch.long else gaps[gathered_rows]

    for rank in (0, 1):
        twin = BetaDPO(rho=0.5)
        twin.gap_std.fill_(0.5)
        rows = layout[rank]
        out = twin(pc[rows], pr[rows], rc[rows], rr[rows], all_gather=gather, rank=rank, order_key=keys[rows])
        assert out.mask.tolist() == out_single.mask[rows].tolist()
        torch.testing.assert_close(out.beta, out_single.beta, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# cDPO, rDPO, ODPO, margin-target regression, SLiC hinge, the RPO NLL term, per-pair weights

H_WIDE = [-2000.0, -300.0, -20.0, -1.5, 0.0, 0.25, 3.0, 40.0, 2000.0]  # with beta = 0.1: beta h = -200 ... +200
M_WIDE = [0.5, -2.0, 1.0, -8.0, 9.0, 3.0, 0.0, 12.0, -4.0]  # Bradley-Terry logit margins, any sign
EPSILONS = [0.0, 0.05, 0.1, 0.25, 0.4]

# real log-probs: h = (pc - rc) - (pr - rr) = [1.5, 0.5, -10, 22]
PC, PR, RC, RR = (
    [-10.0, -3.5, -50.0, -7.0],
    [-12.0, -1.0, -20.0, -30.0],
    [-11.0, -4.0, -45.0, -9.0],
    [-11.5, -1.0, -25.0, -10.0],
)
H_REAL = [(a - c) - (b - d) for a, b, c, d in zip(PC, PR, RC, RR, strict=True)]


def ref_cdpo(h: float, beta: float, eps: float) -> float:
    """-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)."""
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)


def ref_rdpo(h: float, beta: float, eps: float) -> float:
    """[(1 - eps) (-log sigma(beta h)) - eps (-log sigma(-beta h))] / (1 - 2 eps)."""
    return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)


def ref_odpo(h: float, m: float, beta: float, alpha: float, offset: str = "linear") -> float:
    """-log sigma(beta h - Delta),  Delta = alpha m ("linear") or alpha log(m) ("log")."""
    delta = alpha * m if offset == "linear" else alpha * math.log(m)
    return -log_sigmoid(beta * h - delta)


def test_new_reference_data_is_what_the_comments_say() -> None:
    assert H_REAL == [1.5, 0.5, -10.0, 22.0]
    assert [0.1 * h for h in (H_WIDE[0], H_WIDE[-1])] == pytest.approx([-200.0, 200.0], rel=1e-15)


def test_cdpo_hand_values() -> None:
    for beta in (0.1, 0.5):
        for eps in [*EPSILONS, 0.5]:
            losses = cdpo_losses(*pairs(H_WIDE), beta=beta, label_smoothing=eps)
            assert_close(losses, [ref_cdpo(h, beta, eps) for h in H_WIDE])
    # beta h = -200 / +200: log sigma(200) ~ -1.4e-87, so l = (1 - eps) 200 and eps 200 (no inf, no nan)
    assert_close(cdpo_losses(*pairs([-2000.0, 2000.0]), beta=0.1, label_smoothing=0.1), [0.9 * 200.0, 0.1 * 200.0])
    # h = 0: -(1 - eps) log(1/2) - eps log(1/2) = log 2 for every eps
    assert cdpo_losses(*pairs([0.0]), beta=0.1, label_smoothing=0.3).item() == pytest.approx(math.log(2.0), abs=1e-15)
    # on real log-probs, not only on pairs()
    pc, pr, rc, rr = t64(PC), t64(PR), t64(RC), t64(RR)
    assert_close(cdpo_losses(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2), [ref_cdpo(h, 0.5, 0.2) for h in H_REAL])


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.25, 0.4])
def test_cdpo_minimiser_is_the_finite_target(eps: float) -> None:
    # dl/dx = eps sigma(x) - (1 - eps) sigma(-x) vanishes at x = beta h* = log((1 - eps) / eps)
    beta = 0.5
    target = math.log((1 - eps) / eps) / beta
    pc, pr, rc, rr = pairs([target - 1.0, target, target + 1.0], requires_grad=True)
    cdpo_losses(pc, pr, rc, rr, beta=beta, label_smoothing=eps).sum().backward()
    below, at, above = pc.grad.tolist()
    assert below < -1e-3 and abs(at) < 1e-14 and above > 1e-3


def test_rdpo_hand_values() -> None:
    for beta in (0.1, 0.5):
        for eps in [*EPSILONS, 0.49]:
            losses = rdpo_losses(*pairs(H_WIDE), beta=beta, label_smoothing=eps)
            assert_close(losses, [ref_rdpo(h, beta, eps) for h in H_WIDE], rtol=1e-12, atol=1e-10)
    # beta h = -200 / +200 with eps = 0.1: 0.9 * 200 / 0.8 and -0.1 * 200 / 0.8 (finite, and negative: unbounded below)
    ends = rdpo_losses(*pairs([-2000.0, 2000.0]), beta=0.1, label_smoothing=0.1)
    assert_close(ends, [225.0, -25.0])
    assert rdpo_losses(*pairs([0.0]), beta=0.1, label_smoothing=0.3).item() == pytest.approx(math.log(2.0), abs=1e-15)
    pc, pr, rc, rr = t64(PC), t64(PR), t64(RC), t64(RR)
    assert_close(rdpo_losses(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2), [ref_rdpo(h, 0.5, 0.2) for h in H_REAL])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("fn", [cdpo_losses, rdpo_losses])
def test_zero_label_smoothing_is_dpo_exactly(fn, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    logps = [(torch.randn(16, generator=gen, dtype=dtype) * 20 - 100).requires_grad_() for _ in range(2)]
    refs = [torch.randn(16, generator=gen, dtype=dtype) * 20 - 100 for _ in range(2)]
    dpo = dpo_losses(*logps, *refs, beta=0.1)
    dpo_grads = torch.autograd.grad(dpo.mean(), logps)
    smoothed = fn(*logps, *refs, beta=0.1, label_smoothing=0.0)
    smoothed_grads = torch.autograd.grad(smoothed.mean(), logps)
    assert smoothed.dtype == dtype and torch.equal(smoothed, dpo)
    for g, g_dpo in zip(smoothed_grads, dpo_grads, strict=True):
        assert torch.equal(g, g_dpo)
    wide = pairs(H_WIDE, dtype=dtype)
    assert torch.equal(fn(*wide, beta=0.1, label_smoothing=0.0), dpo_losses(*wide, beta=0.1))
    # and a small eps does move it
    assert not torch.equal(fn(*wide, beta=0.1, label_smoothing=1e-3), dpo_losses(*wide, beta=0.1))


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4, 0.49])
def test_rdpo_is_unbiased_under_label_flips(eps: float, beta: float) -> None:
    # a label is kept with probability 1 - eps (margin h) and flipped with probability eps (margin -h)
    flipped_h = [-h for h in H_WIDE]
    kept = rdpo_losses(*pairs(H_WIDE), beta=beta, label_smoothing=eps)
    flipped = rdpo_losses(*pairs(flipped_h), beta=beta, label_smoothing=eps)
    expected_loss = (1 - eps) * kept + eps * flipped
    assert_close(expected_loss, [-log_sigmoid(beta * h) for h in H_WIDE], rtol=1e-10, atol=1e-9)
    # cDPO with the same eps is biased: its expectation is DPO's loss + 2 eps (1 - eps) beta h
    c_kept = cdpo_losses(*pairs(H_WIDE), beta=beta, label_smoothing=eps)
    c_flipped = cdpo_losses(*pairs(flipped_h), beta=beta, label_smoothing=eps)
    bias = (1 - eps) * c_kept + eps * c_flipped - dpo_losses(*pairs(H_WIDE), beta=beta)
    assert_close(bias, [2 * eps * (1 - eps) * beta * h for h in H_WIDE], rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("eps", [-0.01, 0.51, 1.0, float("nan")])
def test_cdpo_label_smoothing_out_of_range_raises(eps: float) -> None:
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0\.5\]"):
        cdpo_losses(*pairs([1.0]), beta=0.1, label_smoothing=eps)


def test_rdpo_label_smoothing_half_raises() -> None:
    with pytest.raises(ValueError, match=r"label_smoothing=0\.5 .*divide by zero.*no information"):
        rdpo_losses(*pairs([1.0]), beta=0.1, label_smoothing=0.5)
    for eps in (-0.01, 0.51, float("nan")):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0\.5\)"):
            rdpo_losses(*pairs([1.0]), beta=0.1, label_smoothing=eps)
    assert torch.isfinite(rdpo_losses(*pairs(H_WIDE), beta=0.1, label_smoothing=0.4999)).all()


def test_odpo_hand_values() -> None:
    for beta, alpha in ((0.1, 1.0), (0.5, 0.3)):
        losses = odpo_losses(*pairs(H_WIDE), t64(M_WIDE), beta=beta, alpha=alpha)
        assert_close(losses, [ref_odpo(h, m, beta, alpha) for h, m in zip(H_WIDE, M_WIDE, strict=True)])
    positive = [abs(m) + 0.01 for m in M_WIDE]  # the paper's form: positive score differences
    losses = odpo_losses(*pairs(H_WIDE), t64(positive), beta=0.1, alpha=0.5, offset="log")
    assert_close(losses, [ref_odpo(h, m, 0.1, 0.5, "log") for h, m in zip(H_WIDE, positive, strict=True)])
    # at beta h = Delta the loss is log 2, whatever h (the offset moves DPO's decision boundary)
    assert_close(odpo_losses(*pairs([30.0, -10.0]), t64([3.0, -1.0]), beta=0.1, alpha=1.0), [math.log(2.0)] * 2)
    assert_close(
        odpo_losses(*pairs([20.0]), t64([math.e**4]), beta=0.1, alpha=0.5, offset="log"), [math.log(2.0)], atol=1e-12
    )
    # beta h = -200 / +200, Delta = 2: l = 202 and ~e^-198 (no inf, no nan)
    assert_close(odpo_losses(*pairs([-2000.0, 2000.0]), t64([2.0, 2.0]), beta=0.1, alpha=1.0), [202.0, 0.0])


@pytest.mark.parametrize("offset", ["linear", "log"])
def test_odpo_alpha_zero_is_dpo(offset: str) -> None:
    margins = t64([abs(m) + 0.5 for m in M_WIDE])
    odpo = odpo_losses(*pairs(H_WIDE), margins, beta=0.1, alpha=0.0, offset=offset)
    assert torch.equal(odpo, dpo_losses(*pairs(H_WIDE), beta=0.1))
    assert not torch.equal(odpo_losses(*pairs(H_WIDE), margins, beta=0.1, alpha=0.5, offset=offset), odpo)


def test_odpo_log_offset_requires_positive_margins() -> None:
    h, m = [1.0, 2.0, 3.0, 4.0], [1.0, 0.0, -2.0, 3.0]
    with pytest.raises(ValueError, match=r"must be > 0: 2 of 4 margins are <= 0"):
        odpo_losses(*pairs(h), t64(m), beta=0.1, alpha=1.0, offset="log")
    with pytest.raises(ValueError, match=r"1 of 2 margins are <= 0 \(or NaN\)"):
        odpo_losses(*pairs([1.0, 2.0]), t64([float("nan"), 3.0]), beta=0.1, alpha=1.0, offset="log")
    # the linear offset (the default) takes signed margins
    losses = odpo_losses(*pairs(h), t64(m), beta=0.1, alpha=1.0)
    assert_close(losses, [ref_odpo(x, y, 0.1, 1.0) for x, y in zip(h, m, strict=True)])


def test_margin_target_hand_values() -> None:
    for beta, eta in ((0.1, 1.0), (0.5, 0.25)):
        losses = margin_target_losses(*pairs(H_WIDE), t64(M_WIDE), beta=beta, eta=eta)
        assert_close(losses, [(beta * h - eta * m) ** 2 for h, m in zip(H_WIDE, M_WIDE, strict=True)])
    # eta = 0: (beta h)^2 whatever the margins
    losses = margin_target_losses(*pairs(H_WIDE), t64(M_WIDE), beta=0.1, eta=0.0)
    assert_close(losses, [(0.1 * h) ** 2 for h in H_WIDE])
    # on target (beta h = eta m) the loss is 0
    assert margin_target_losses(*pairs([40.0]), t64([8.0]), beta=0.1, eta=0.5).item() == 0.0
    # m = 1, eta = 1/2: beta^2 (h - 1 / (2 beta))^2 = beta^2 * IPO
    for beta in (0.1, 0.25):
        losses = margin_target_losses(*pairs(H), torch.ones(len(H), dtype=F64), beta=beta, eta=0.5)
        assert_close(losses, [beta**2 * (h - 1 / (2 * beta)) ** 2 for h in H])
        torch.testing.assert_close(losses, beta**2 * ipo_losses(*pairs(H), beta=beta), rtol=1e-12, atol=1e-12)


def test_hinge_hand_values_and_kink() -> None:
    for beta in (0.1, 0.5):
        assert_close(hinge_losses(*pairs(H_WIDE), beta=beta), [max(0.0, 1.0 - beta * h) for h in H_WIDE])
    assert_close(hinge_losses(*pairs([-2000.0, 2000.0]), beta=0.1), [201.0, 0.0])
    beta = 0.5
    h = [-400.0, -3.0, 0.0, 1.9, 1.99, 2.01, 2.1, 10.0, 400.0]  # beta h = 1 at h = 2
    pc, pr, rc, rr = pairs(h, requires_grad=True)
    pr.requires_grad_()
    hinge_losses(pc, pr, rc, rr, beta=beta).sum().backward()
    assert pc.grad.tolist() == [-beta if beta * x < 1 else 0.0 for x in h]
    assert pr.grad.tolist() == [beta if beta * x < 1 else 0.0 for x in h]


GRAD_CASES = {
    # name: (loss on (pc, pr, rc, rr, margins), dl/dh by hand as a function of (h, m))
    "cdpo": (
        lambda *t: cdpo_losses(*t[:4], beta=0.5, label_smoothing=0.2),
        lambda h, m: 0.5 * (0.2 * sigmoid(0.5 * h) - 0.8 * sigmoid(-0.5 * h)),
    ),
    "rdpo": (
        lambda *t: rdpo_losses(*t[:4], beta=0.5, label_smoothing=0.2),
        lambda h, m: -0.5 * (0.8 * sigmoid(-0.5 * h) + 0.2 * sigmoid(0.5 * h)) / 0.6,
    ),
    "odpo_linear": (
        lambda *t: odpo_losses(*t, beta=0.5, alpha=0.7),
        lambda h, m: -0.5 * sigmoid(-(0.5 * h - 0.7 * m)),
    ),
    "odpo_log": (
        lambda *t: odpo_losses(*t[:4], t[4].abs().detach().requires_grad_(), beta=0.5, alpha=0.7, offset="log"),
        lambda h, m: -0.5 * sigmoid(-(0.5 * h - 0.7 * math.log(abs(m)))),
    ),
    "margin_target": (
        lambda *t: margin_target_losses(*t, beta=0.5, eta=0.3),
        lambda h, m: 2 * 0.5 * (0.5 * h - 0.3 * m),
    ),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_hand_derivatives(name: str) -> None:
    loss_fn, dl_dh = GRAD_CASES[name]
    m = [0.5, -2.0, 1.0, -8.0]
    pc, pr = t64(PC).requires_grad_(), t64(PR).requires_grad_()
    rc, rr = t64(RC).requires_grad_(), t64(RR).requires_grad_()
    margins = t64(m).requires_grad_()
    loss_fn(pc, pr, rc, rr, margins).sum().backward()
    d = [dl_dh(h, x) for h, x in zip(H_REAL, m, strict=True)]
    # h = (pc - rc) - (pr - rr): dl/dpc = dl/dh, dl/dpr = -dl/dh (and the reference gets the opposite)
    assert_close(pc.grad, d)
    assert_close(pr.grad, [-x for x in d])
    assert_close(rc.grad, [-x for x in d])
    assert_close(rr.grad, d)
    assert margins.grad is None  # the reward-model margins are detached


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_new_losses_are_finite_at_large_margins(dtype: torch.dtype) -> None:
    h = [-2000.0, 2000.0]  # beta = 0.1: beta h = -200 and +200
    cases = [
        (lambda *t: cdpo_losses(*t, beta=0.1, label_smoothing=0.1), [180.0, 20.0]),
        (lambda *t: rdpo_losses(*t, beta=0.1, label_smoothing=0.1), [225.0, -25.0]),
        (lambda *t: odpo_losses(*t, torch.tensor([2.0, 2.0], dtype=dtype), beta=0.1, alpha=1.0), [202.0, 0.0]),
        (
            lambda *t: odpo_losses(*t, torch.tensor([2.0, 2.0], dtype=dtype), beta=0.1, alpha=1.0, offset="log"),
            [200.0 + math.log(2.0), 0.0],
        ),
        (
            lambda *t: margin_target_losses(*t, torch.tensor([3.0, 3.0], dtype=dtype), beta=0.1, eta=1.0),
            [203**2, 197**2],
        ),
        (lambda *t: hinge_losses(*t, beta=0.1), [201.0, 0.0]),
    ]
    for fn, expected in cases:
        pc, pr, rc, rr = pairs(h, dtype=dtype, requires_grad=True)
        losses = fn(pc, pr, rc, rr)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
        assert_close(losses, expected, rtol=1e-6, atol=1e-6)


def test_new_losses_dtype_policy() -> None:
    bf = pairs([1.0, -2.0], dtype=torch.bfloat16)
    m_bf = torch.tensor([0.5, 1.0], dtype=torch.bfloat16)
    # the h-only losses stay in the input dtype, like dpo_losses ...
    assert dpo_losses(*bf).dtype == torch.bfloat16
    assert cdpo_losses(*bf, label_smoothing=0.1).dtype == torch.bfloat16
    assert rdpo_losses(*bf, label_smoothing=0.1).dtype == torch.bfloat16
    assert hinge_losses(*bf).dtype == torch.bfloat16
    # ... margins, counts and weights are taken in float32, like madpo_weights, so those results are at least float32
    assert odpo_losses(*bf, m_bf, alpha=1.0).dtype == torch.float32
    assert odpo_losses(*bf, m_bf, alpha=1.0, offset="log").dtype == torch.float32
    assert margin_target_losses(*bf, m_bf, eta=1.0).dtype == torch.float32
    assert chosen_nll(bf[0], torch.tensor([3, 4])).dtype == torch.float32
    assert weighted(dpo_losses(*bf), m_bf).dtype == torch.float32
    # float64 stays float64
    f64 = pairs([1.0, -2.0])
    m64 = t64([0.5, 1.0])
    for out in (
        cdpo_losses(*f64, label_smoothing=0.1),
        rdpo_losses(*f64, label_smoothing=0.1),
        hinge_losses(*f64),
        odpo_losses(*f64, m64, alpha=1.0),
        margin_target_losses(*f64, m64, eta=1.0),
        chosen_nll(f64[0], torch.tensor([3, 4])),
        weighted(dpo_losses(*f64), m64),
    ):
        assert out.dtype == F64


def test_chosen_nll_hand_values_and_rpo_composition() -> None:
    logps, counts = [-12.0, -3.5, -250.0, 0.0], [4, 1, 100, 7]
    lp = t64(logps).requires_grad_()
    n = torch.tensor(counts)
    nll = chosen_nll(lp, n)
    assert_close(nll, [-x / k for x, k in zip(logps, counts, strict=True)])
    nll.sum().backward()
    assert_close(lp.grad, [-1.0 / k for k in counts])
    float_counts = t64([float(k) for k in counts]).requires_grad_()
    chosen_nll(t64(logps).requires_grad_(), float_counts).sum().backward()
    assert float_counts.grad is None  # the counts are detached
    # RPO: a preference loss plus alpha times the chosen completion's token-mean NLL, pair by pair
    pc, pr, rc, rr = t64(PC), t64(PR), t64(RC), t64(RR)
    n_c = [5, 2, 40, 9]
    rpo = dpo_losses(pc, pr, rc, rr, beta=0.5) + 0.3 * chosen_nll(pc, torch.tensor(n_c))
    expected = [-log_sigmoid(0.5 * h) + 0.3 * (-x / k) for h, x, k in zip(H_REAL, PC, n_c, strict=True)]
    assert_close(rpo, expected)


@pytest.mark.parametrize(
    "counts,n_bad", [([3, 0, 2], 1), ([0.5, -1.0, 2.0], 2), ([float("nan"), float("inf"), 1.0], 2)]
)
def test_chosen_nll_rejects_bad_counts(counts: list, n_bad: int) -> None:
    with pytest.raises(ValueError, match=rf"chosen_token_counts must be finite and >= 1: {n_bad} of 3 entries"):
        chosen_nll(t64([-1.0, -2.0, -3.0]), torch.tensor(counts))


def test_weighted_hand_values() -> None:
    values, w = [0.5, 2.0, 1.25, 3.0], [1.0, 0.0, 2.5, 0.3]
    losses = t64(values).requires_grad_()
    weights = t64(w).requires_grad_()
    out = weighted(losses, weights)
    assert_close(out, [x * y for x, y in zip(values, w, strict=True)])
    out.sum().backward()
    assert_close(losses.grad, w)
    assert weights.grad is None  # the weight column is data: detached
    # integer and boolean weight columns
    assert_close(weighted(t64(values), torch.tensor([1, 0, 3, 2])), [0.5, 0.0, 3.75, 6.0])
    assert_close(weighted(t64(values), torch.tensor([True, False, True, False])), [0.5, 0.0, 1.25, 0.0])
    # MADPO's losses are DPO's losses weighted by its w
    h, m = [-20.0, -1.5, 0.0, 3.0, 15.0], [0.5, -2.0, 1.0, -8.0, 9.0]
    madpo, w_madpo = madpo_losses_and_weights(*pairs(h), t64(m), beta=0.1)
    assert torch.equal(weighted(dpo_losses(*pairs(h), beta=0.1), w_madpo), madpo)


@pytest.mark.parametrize(
    "w,match",
    [
        ([1.0, float("nan"), float("inf"), 0.5], r"weights must be finite: 2 of 4 entries are NaN or inf"),
        ([1.0, float("-inf"), 2.0, 0.5], r"weights must be finite: 1 of 4 entries"),
        ([1.0, -0.5, 2.0, -3.0], r"weights must be >= 0: 2 of 4 entries are negative"),
        ([1.0, -1e-300, 2.0, 0.0], r"weights must be >= 0: 1 of 4 entries are negative"),
    ],
)
def test_weighted_rejects_bad_weights(w: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted(t64([1.0, 2.0, 3.0, 4.0]), t64(w))


def test_weighted_accepts_zero_weights() -> None:
    assert_close(weighted(t64([1.0, 2.0]), t64([0.0, -0.0])), [0.0, 0.0])


def _new_bad_shape_calls() -> list:
    b, b1, b3 = torch.zeros(4), torch.zeros(4, 1), torch.zeros(3)
    ones, ones1 = torch.ones(4), torch.ones(4, 1)
    return [
        lambda: cdpo_losses(b1, b, b, b, label_smoothing=0.1),
        lambda: cdpo_losses(b1, b1, b1, b1, label_smoothing=0.1),  # consistent but not (B,)
        lambda: rdpo_losses(b, b, b1, b, label_smoothing=0.1),
        lambda: odpo_losses(b, b1, b, b, ones, alpha=1.0),
        lambda: odpo_losses(b, b, b, b, b1, alpha=1.0),
        lambda: odpo_losses(b, b, b, b, b3, alpha=1.0, offset="log"),
        lambda: margin_target_losses(b, b, b, b1, b, eta=1.0),
        lambda: margin_target_losses(b, b, b, b, b1, eta=1.0),
        lambda: hinge_losses(b, b, b, b1),
        lambda: chosen_nll(b, ones1),
        lambda: chosen_nll(b1, ones1),
        lambda: chosen_nll(b, torch.ones(3)),
        lambda: weighted(b, b1),
        lambda: weighted(b, b3),
    ]


@pytest.mark.parametrize("call", _new_bad_shape_calls())
def test_new_shape_mismatch_raises(call) -> None:
    with pytest.raises(ValueError, match=r"same shape \[B\].*(\[4, 1\]|\[3\])"):
        call()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: cdpo_losses(*pairs([1.0]), beta=0.0, label_smoothing=0.1), "beta"),
        (lambda: rdpo_losses(*pairs([1.0]), beta=-0.1, label_smoothing=0.1), "beta"),
        (lambda: hinge_losses(*pairs([1.0]), beta=0.0), "beta"),
        (lambda: odpo_losses(*pairs([1.0]), t64([1.0]), beta=0.0, alpha=1.0), "beta"),
        (lambda: odpo_losses(*pairs([1.0]), t64([1.0]), alpha=-1.0), "alpha"),
        (lambda: odpo_losses(*pairs([1.0]), t64([1.0]), alpha=float("nan")), "alpha"),
        (lambda: odpo_losses(*pairs([1.0]), t64([1.0]), alpha=float("inf")), "alpha"),
        (lambda: odpo_losses(*pairs([1.0]), t64([1.0]), alpha=1.0, offset="exp"), "offset.*exp"),
        (lambda: margin_target_losses(*pairs([1.0]), t64([1.0]), beta=0.0, eta=1.0), "beta"),
        (lambda: margin_target_losses(*pairs([1.0]), t64([1.0]), eta=-0.5), "eta"),
        (lambda: margin_target_losses(*pairs([1.0]), t64([1.0]), eta=float("nan")), "eta"),
    ],
)
def test_new_invalid_options_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
