"""Tests for madpo/losses: the implicit margin, c(|m|), w(m), DPO, IPO, MADPO and Bradley-Terry.

Expected values are computed from the formulas of docs/method.md with ``math`` on Python floats (float64), never
with the library's own functions (tests/loss_refs.py).
"""

import math

import pytest
import torch

from madpo.losses import (
    BetaDPO,
    amplification_coefficient,
    bradley_terry_losses,
    dpo_losses,
    implicit_margin,
    ipo_losses,
    madpo_losses,
    madpo_losses_and_weights,
    madpo_weights,
)
from tests.loss_refs import F64, TAU, H, assert_close, log_sigmoid, pairs, ref_c, ref_w, sigmoid, t64

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
