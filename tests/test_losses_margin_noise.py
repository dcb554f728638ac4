"""Tests for the losses that use the margin another way or resist label noise: cDPO, rDPO, ODPO, margin-target
regression, the SLiC hinge, the RPO NLL term and per-pair weights, against float64 references
(tests/loss_refs.py)."""

import math

import pytest
import torch

from madpo.losses import (
    cdpo_losses,
    chosen_nll,
    dpo_losses,
    hinge_losses,
    ipo_losses,
    madpo_losses_and_weights,
    margin_target_losses,
    odpo_losses,
    rdpo_losses,
    weighted,
)
from tests.loss_refs import F64, H, assert_close, log_sigmoid, pairs, sigmoid, t64

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
