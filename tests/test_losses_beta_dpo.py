"""Tests for β-DPO (docs/method.md eq. 7–12): the batch-adaptive β, the EMA, the data filter and its state,
against float64 references (tests/loss_refs.py)."""

import copy
import math
import statistics

import pytest
import torch

from madpo.losses import (
    BetaDPO,
    implicit_margin,
    madpo_weights,
)
from tests.loss_refs import F64, assert_close, log_sigmoid, pairs, ref_w, sigmoid, t64

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
    assert out1.clamped.item() == out2.clamped.item() == 0.0  # above the floor: not counted as clamped


def test_beta_dpo_clamps_beta_at_min_beta() -> None:
    a = [-10.0, -10.5, -9.5, -10.0, -11.0, -9.0, -10.25, -9.75]  # mean_kept ~ -10, mu ~ -1: 1 + 0.6 * (-9) < 0
    out = BetaDPO(min_beta=1e-3)(*pairs(a))
    assert out.beta.item() == 1e-3 and out.clamped.item() == 1.0
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
# the MADPO repository's variant (docs/method.md, "The MADPO repository's β-DPO")


def expected_repo_step(
    h: list[float], mask: list[bool], center: float, scale: float, beta0: float = 0.1, alpha: float = 0.6
) -> tuple[float, float, float, list[float]]:
    """One step from EMAs (center, scale): M = beta0 h; center, scale updated first (scale on std + 1e-6); beta from
    the mean of all M, unclamped; l_i = mask_i (N / N_kept) (-log sigma(beta h_i))."""
    m = [beta0 * x for x in h]
    center = 0.9 * center + 0.1 * statistics.fmean(m)
    scale = 0.9 * scale + 0.1 * (statistics.stdev(m) + 1e-6)
    beta = beta0 * (1 + alpha * (statistics.fmean(m) - center))
    n_kept = sum(mask)
    losses = [(len(h) / n_kept) * -log_sigmoid(beta * x) if k else 0.0 for x, k in zip(h, mask, strict=True)]
    return center, scale, beta, losses


def test_madpo_repo_variant_two_steps_against_the_hand_computed_update() -> None:
    mod = BetaDPO(variant="madpo_repo")
    assert mod.gap_mean.item() == 0.0 and mod.gap_std.item() == 1.0  # EMAs start at (0, 1)
    center, scale = 0.0, 1.0
    for h in (A1, A2):
        out = mod(*pairs(h))
        mask = out.mask.tolist()
        assert sum(mask) == 6
        center, scale, beta, losses = expected_repo_step(h, mask, center, scale)
        assert out.gap_mean.item() == pytest.approx(center, rel=1e-6)
        assert out.gap_std.item() == pytest.approx(scale, rel=1e-6)
        assert out.beta.item() == pytest.approx(beta, rel=1e-6)
        assert_close(out.losses, losses, rtol=1e-6, atol=1e-9)
        # beta comes from all pairs, not the kept ones as in the official code (which would give another value here)
        kept_mean = statistics.fmean(0.1 * x for x, k in zip(h, mask, strict=True) if k)
        assert abs(0.1 * (1 + 0.6 * (kept_mean - center)) - beta) > 1e-4
    assert int(mod.step) == 2


def test_madpo_repo_variant_lets_beta_go_negative_and_counts_the_step() -> None:
    h = [-30.0, -31.0, -29.0, -30.5, -29.5, -30.0, -28.0, -32.0]  # mean M = -3, center -0.3: 1 + 0.6 (-2.7) < 0
    out = BetaDPO(variant="madpo_repo")(*pairs(h))
    _, _, beta, losses = expected_repo_step(h, out.mask.tolist(), 0.0, 1.0)
    assert beta < 0 and out.beta.item() == pytest.approx(beta, rel=1e-6) and out.clamped.item() == 1.0
    assert_close(out.losses, losses, rtol=1e-6, atol=1e-9)
    official = BetaDPO()(*pairs(h))
    assert official.beta.item() == 1e-3 and official.clamped.item() == 1.0


def test_madpo_repo_variant_filters_out_a_far_gap() -> None:
    mod = BetaDPO(variant="madpo_repo", rho=0.2)
    h = [0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.5, -1.5, 500.0]
    for _ in range(30):
        out = mod(*pairs(h))
    assert not out.mask[-1]


def test_the_madpo_repo_loss_is_a_preset_with_beta_dpos_options() -> None:
    from madpo.losses import BetaDPOLoss, MADPORepoBetaDPOLoss
    from madpo.pipeline.presets import method_name, preset_loss

    repo, official = preset_loss("beta_dpo_madpo_repo"), preset_loss("beta_dpo")
    assert type(repo) is MADPORepoBetaDPOLoss and repo.variant == "madpo_repo"
    assert type(official) is BetaDPOLoss and official.variant == "official"
    # same options: a cached official beta-DPO run keeps its key; the class tells the two apart
    assert repo.init_args() == official.init_args()
    assert method_name(repo) == "beta_dpo_madpo_repo" and method_name(official) == "beta_dpo"
    with pytest.raises(ValueError, match="variant"):
        BetaDPO(variant="paper")


def test_filter_only_preset_keeps_the_filter_and_fixes_beta() -> None:
    """`beta_dpo_filter_only` (alpha = 0) draws the same kept pairs as the repository variant on the same batches
    (the filter reads the EMAs, which alpha does not touch) and trains them with beta0 at every step."""
    from madpo.losses import MADPORepoBetaDPOLoss
    from madpo.pipeline.presets import method_name, preset_loss

    filter_only, repo = preset_loss("beta_dpo_filter_only"), preset_loss("beta_dpo_madpo_repo")
    assert type(filter_only) is MADPORepoBetaDPOLoss and filter_only.init_args()["alpha"] == 0.0
    assert method_name(filter_only) == "beta_dpo_filter_only" and method_name(repo) == "beta_dpo_madpo_repo"
    a, b = BetaDPO(variant="madpo_repo", alpha=0.0), BetaDPO(variant="madpo_repo")
    center, scale = 0.0, 1.0
    for h in (A1, A2):
        out, ref = a(*pairs(h)), b(*pairs(h))
        assert out.mask.tolist() == ref.mask.tolist()
        center, scale, beta, losses = expected_repo_step(h, out.mask.tolist(), center, scale, alpha=0.0)
        assert beta == 0.1 and out.beta.item() == pytest.approx(0.1, rel=1e-7)
        assert abs(ref.beta.item() - 0.1) > 1e-4  # the adaptive variant's beta moved on the same batch
        assert_close(out.losses, losses, rtol=1e-6, atol=1e-9)
