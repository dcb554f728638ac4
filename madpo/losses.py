"""Preference-optimisation losses: MADPO, DPO, IPO, beta-DPO and the Bradley-Terry reward-model loss.

Pure maths on tensors. Every function takes per-pair tensors of shape (B,) and returns per-pair values of shape (B,);
the caller reduces with ``.mean()`` (with equal per-rank batches, DDP's average of per-rank means is the global mean).
Formulas follow ``method.md`` (sections 1, 2 and 4); the equation each function implements sits in its docstring.

Notation:
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]    implicit margin
    m = r(x, y_w) - r(x, y_l)                                                        reward-model margin (detached)
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Variant = Literal["full", "amp_only", "reg_only", "no_downweight", "no_amplify"]
VARIANTS: tuple[str, ...] = ("full", "amp_only", "reg_only", "no_downweight", "no_amplify")
DEFAULT_TAU = math.log(999.0)  # ln(0.999 / 0.001) ~ 6.9068, the paper's "tau = 7"


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _check_pairs(**tensors: Tensor) -> int:
    """Check that every tensor has the same 1-D shape (B,) and return B.

    ``[B, 1] - [B]`` silently broadcasts to ``[B, B]``, so anything but identical 1-D shapes is an error.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        got = ", ".join(f"{name}={list(s)}" for name, s in shapes.items())
        raise ValueError(f"expected per-pair tensors that all have the same shape [B], got {got}")
    return first[0]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {name}={value!r}")


def _weight_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, float32, integers) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _resolve_c_min(c_max: float, c_min: float | None, lam: float, tau: float) -> float:
    """Validate the MADPO options and return c_min (default 1 / c_max). Requires c_min < 1 < c_max when c_max > 1."""
    if not c_max >= 1:
        raise ValueError(f"c_max must be >= 1 (c_max = 1 is plain DPO), got c_max={c_max!r}")
    _check_positive(lam=lam, tau=tau)
    if c_min is None:
        c_min = 1.0 / c_max
    if not c_min > 0:
        raise ValueError(f"c_min must be > 0, got c_min={c_min!r}")
    if c_max > 1 and not c_min < 1:
        raise ValueError(f"c_min must be < 1 (c_min = 1 divides by zero in K), got c_min={c_min!r}")
    return c_min


# ----------------------------------------------------------------------------------------------------------------------
# section 1: implicit margin


def implicit_margin(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
) -> Tensor:
    """h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), shape (B,)."""
    _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


# ----------------------------------------------------------------------------------------------------------------------
# section 2: MADPO


def amplification_coefficient(
    abs_margins: Tensor,
    *,
    c_max: float = 4.0,
    c_min: float | None = None,
    lam: float = 1.0,
    tau: float = DEFAULT_TAU,
) -> Tensor:
    """Section 2.1: c(|m|) = c_min + (c_max - c_min) / (1 + K exp(lam (|m| - tau))),  K = (c_max - 1) / (1 - c_min).

    Decreasing in |m|, c(tau) = 1, c -> c_min as |m| -> inf. ``c_min=None`` means 1 / c_max. ``c_max == 1`` is c == 1
    (the formula would be 0/0). For huge |m| the exp overflows to inf and c is exactly c_min (no NaN).
    Computed without gradient in float32 (float64 if the input is float64).
    """
    c_min = _resolve_c_min(c_max, c_min, lam, tau)
    a = abs_margins.detach().to(_weight_dtype(abs_margins))
    if c_max == 1:
        return torch.ones_like(a)
    k = (c_max - 1.0) / (1.0 - c_min)
    return c_min + (c_max - c_min) / (1.0 + k * torch.exp(lam * (a - tau)))


def madpo_weights(
    margins: Tensor,
    *,
    c_max: float = 4.0,
    c_min: float | None = None,
    lam: float = 1.0,
    tau: float = DEFAULT_TAU,
    variant: Variant = "full",
) -> Tensor:
    """Sections 2.2, 2.4, 2.7: w(m) = sigma(c_eff m) / sigma(m) if m > -tau, else 1 (stability cap), shape (B,).

    c_eff = c(|m|) ("full"), max(c, 1) ("amp_only": no dampening), min(c, 1) ("reg_only": no amplification).
    Decomposition variants (not in the paper; they switch off one effect of w at a time): "no_downweight" clips the
    full weight to w >= 1 (pairs the reward model contradicts keep weight 1), "no_amplify" clips it to w <= 1.
    log w = logsigmoid(c_eff m) - logsigmoid(m) is computed in log space (never a ratio of sigmoids), in float32 for
    fp16/bf16/float32 input and float64 for float64 input. The margins are detached: weights never carry gradient.
    ``c_max == 1`` returns exactly ones (plain DPO). A NaN margin gives a NaN weight (it is not silently capped to 1).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got variant={variant!r}")
    _check_pairs(margins=margins)
    m = margins.detach().to(_weight_dtype(margins))
    c = amplification_coefficient(m.abs(), c_max=c_max, c_min=c_min, lam=lam, tau=tau)  # validates the options
    if c_max == 1:
        return c  # exactly ones
    if variant == "amp_only":
        c = c.clamp(min=1.0)
    elif variant == "reg_only":
        c = c.clamp(max=1.0)
    log_w = F.logsigmoid(c * m) - F.logsigmoid(m)
    if variant == "no_downweight":
        log_w = log_w.clamp(min=0.0)
    elif variant == "no_amplify":
        log_w = log_w.clamp(max=0.0)
    return torch.where(m <= -tau, torch.ones_like(m), torch.exp(log_w))


def madpo_losses_and_weights(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    margins: Tensor,
    *,
    beta: float = 0.1,
    c_max: float = 4.0,
    c_min: float | None = None,
    lam: float = 1.0,
    tau: float = DEFAULT_TAU,
    variant: Variant = "full",
) -> tuple[Tensor, Tensor]:
    """Section 2: l_i = w(m_i) * (-log sigma(beta h_i)); returns (losses, weights), both (B,).

    The batch loss is the plain mean ``losses.mean()`` (not divided by sum(w)), as in the paper. The weights are
    returned for logging (mean/min/max); they are detached and float32 (float64 for float64 margins), so the losses
    are at least float32.
    """
    dpo = dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta)
    _check_pairs(losses=dpo, margins=margins)
    weights = madpo_weights(margins, c_max=c_max, c_min=c_min, lam=lam, tau=tau, variant=variant)
    return weights * dpo, weights


def madpo_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    margins: Tensor,
    *,
    beta: float = 0.1,
    c_max: float = 4.0,
    c_min: float | None = None,
    lam: float = 1.0,
    tau: float = DEFAULT_TAU,
    variant: Variant = "full",
) -> Tensor:
    """Section 2: l_i = w(m_i) * (-log sigma(beta h_i)), shape (B,). ``madpo_losses_and_weights`` also gives w."""
    losses, _ = madpo_losses_and_weights(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        margins,
        beta=beta,
        c_max=c_max,
        c_min=c_min,
        lam=lam,
        tau=tau,
        variant=variant,
    )
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# section 4: baselines


def dpo_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Section 4.1: l_i = -log sigma(beta h_i) = softplus(-beta h_i), shape (B,).

    Written as -logsigmoid, which is exact everywhere (F.softplus switches to the linear branch above its threshold).
    """
    _check_positive(beta=beta)
    h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h)


def ipo_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Section 4.2: l_i = (h_i - 1 / (2 beta))^2, shape (B,).

    The caller chooses the form: summed log-probs (paper parity) or log-probs divided by the completion token count.
    """
    _check_positive(beta=beta)
    h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def bradley_terry_losses(
    chosen_rewards: Tensor, rejected_rewards: Tensor, *, target_margin: float | Tensor | None = None
) -> Tensor:
    """Section 3: l_i = -log sigma(r_w - r_l - target_margin), shape (B,). ``target_margin`` is a float or (B,)."""
    if isinstance(target_margin, Tensor):
        _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, target_margin=target_margin)
    else:
        _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    logits = chosen_rewards - rejected_rewards
    if target_margin is not None:
        logits = logits - target_margin
    return -F.logsigmoid(logits)


# ----------------------------------------------------------------------------------------------------------------------
# section 4.3: beta-DPO (Wu et al. 2024), as in the official code, with the port pitfalls handled


@dataclass
class BetaDPOOutput:
    """What ``BetaDPO.forward`` returns. All 0-dim values are detached."""

    losses: Tensor  # (B,) this rank's per-pair losses; see BetaDPO.forward for the reduction convention
    mask: Tensor  # (B,) bool, this rank's slice of the global kept-pair mask
    beta: Tensor  # 0-dim, the effective beta_batch
    gap_mean: Tensor  # 0-dim, EMA mu used for this batch
    gap_std: Tensor  # 0-dim, EMA s used for this batch
    kept_fraction: Tensor  # 0-dim, N_kept / N_global


@dataclass
class BetaDPOSelection:
    """What ``BetaDPO.select`` decides for one training step (CPU, float64, detached)."""

    mask: Tensor  # (B,) bool, this rank's slice of the global kept-pair mask
    beta: Tensor  # 0-dim beta_batch
    gap_mean: Tensor  # 0-dim EMA mu used
    gap_std: Tensor  # 0-dim EMA s used
    n: int  # pairs in the global batch
    n_kept: int  # pairs kept


class BetaDPO(torch.nn.Module):
    """beta-DPO: a batch-level beta and a Gaussian filter on the implicit margin, with EMA state in buffers.

    Per training step (method.md section 4.3), with A_i = h_i detached and not beta-scaled, gathered over ranks:
        mu <- momentum mu + (1 - momentum) mean(A)        s <- momentum s + (1 - momentum) std(A)    (before use)
        p_i = exp(-0.5 ((A_i - mu) / s)^2)                draw int(N (1 - rho)) indices without replacement, prop. p
        beta_batch = max(min_beta, beta0 (1 + alpha (mean_kept(A) - mu)))                                 (detached)
        loss = mean over kept pairs of -log sigma(beta_batch h_i)

    Port pitfalls handled:
    - The EMAs (``gap_mean``, ``gap_std``) and the update count (``step``) are persistent buffers, so they are in
      ``state_dict`` and survive a resume. They are float32; keep the module out of a blanket ``.half()``/bf16 cast.
    - The mask is drawn on CPU in float64 with a dedicated ``torch.Generator`` seeded from (seed, step): every rank sees
      the same gathered A and the same generator, so all ranks draw the same mask, and a resumed run redraws it.
    - In eval mode nothing is updated: the EMAs are only read and ``step`` is not advanced.
    - Uniform mask while s <= eps: the EMAs start at 0, so step 1 has s = (1 - momentum) std(A); when policy ==
      reference at init (LoRA B = 0, dropout off) A == 0 up to rounding and s ~ 0, and the filter would be 0/0 or a
      draw on rounding noise. Filtering on a degenerate spread carries no information, so every pair is then equally
      likely to be kept. The default eps lies above float32's resolution of a difference of summed log-probs (its
      unit in the last place is ~1e-5 at |log pi| ~ 100), so whether the filter acts never depends on how one
      machine, batch layout or kernel rounded.
    """

    gap_mean: Tensor
    gap_std: Tensor
    step: Tensor

    def __init__(
        self,
        beta: float = 0.1,
        alpha: float = 0.6,
        rho: float = 0.2,
        momentum: float = 0.9,
        min_beta: float = 1e-3,
        eps: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_positive(beta=beta, min_beta=min_beta)
        if not 0 <= rho < 1:
            raise ValueError(f"rho (fraction of pairs filtered out) must be in [0, 1), got rho={rho!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got eps={eps!r}")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got alpha={alpha!r}")
        self.beta0, self.alpha, self.rho, self.momentum = beta, alpha, rho, momentum
        self.min_beta, self.eps, self.seed = min_beta, eps, int(seed)
        self.register_buffer("gap_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("gap_std", torch.zeros((), dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"beta={self.beta0}, alpha={self.alpha}, rho={self.rho}, momentum={self.momentum}, seed={self.seed}"

    def _generator(self, step: int) -> torch.Generator:
        """A CPU generator seeded from (seed, step): identical on every rank and after a resume."""
        return torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + step) % 2**63)

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        *,
        all_gather: Callable[[Tensor], Tensor] | None = None,
        rank: int = 0,
        order_key: Tensor | None = None,
    ) -> BetaDPOOutput:
        """Per-pair beta-DPO losses for this rank's (B,) pairs.

        ``all_gather`` maps the local (B,) tensor to the global (world * B,) tensor in rank order (None: single
        process); ``rank`` locates this rank's slice [rank * B, (rank + 1) * B). Every rank must have the same B.
        ``order_key`` (optional, (B,), e.g. dataset row indices) puts the gathered batch in a canonical order before
        the statistics and the draw, so the mask does not depend on how pairs were spread over ranks: N ranks then
        draw exactly what one process draws on the same global batch.

        Reduction convention: ``losses_i = mask_i * (N / N_kept) * (-log sigma(beta_batch h_i))`` with N = world * B,
        so ``losses.mean()`` on each rank, averaged over ranks (what DDP does with gradients), equals the mean of
        -log sigma(beta_batch h_i) over the globally kept pairs (the official "mean over kept pairs").
        """
        h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        selection = self.select(h.detach(), all_gather=all_gather, rank=rank, order_key=order_key)
        dtype = _weight_dtype(h)
        # 5. per-pair losses on this rank's slice, scaled so that the DDP-averaged mean is the mean over kept pairs
        mask = selection.mask.to(h.device)
        beta_t = selection.beta.to(device=h.device, dtype=dtype)
        per_pair = -F.logsigmoid(beta_t * h.to(dtype))
        losses = torch.where(mask, per_pair * (selection.n / selection.n_kept), torch.zeros_like(per_pair))
        return BetaDPOOutput(
            losses=losses,
            mask=mask,
            beta=beta_t,
            gap_mean=selection.gap_mean.to(device=h.device, dtype=dtype),
            gap_std=selection.gap_std.to(device=h.device, dtype=dtype),
            kept_fraction=torch.tensor(selection.n_kept / selection.n, device=h.device, dtype=dtype),
        )

    def select(
        self,
        gaps: Tensor,
        *,
        all_gather: Callable[[Tensor], Tensor] | None = None,
        rank: int = 0,
        order_key: Tensor | None = None,
    ) -> BetaDPOSelection:
        """Steps 1-4 on this rank's detached gaps (B,): the EMA update (training only), the kept-pair mask and
        beta_batch. `forward` calls it on its batch; with gradient accumulation the policy module calls it once per
        optimiser step on the gaps of the whole step, as the method defines it."""
        b = gaps.shape[0]

        # 1. gap A: detached, not beta-scaled, gathered over ranks; statistics on CPU in float64 (rank-identical)
        a_local = gaps.detach()
        a_global = a_local if all_gather is None else all_gather(a_local)
        if a_global.dim() != 1 or b == 0 or a_global.shape[0] % b != 0:
            raise ValueError(f"all_gather must return [world * B] with B={b}, got {list(a_global.shape)}")
        n = a_global.shape[0]
        if not 0 <= rank < n // b:
            raise ValueError(f"rank must be in [0, {n // b}) for a gathered batch of {n} and B={b}, got rank={rank}")
        a = a_global.to(device="cpu", dtype=torch.float64)
        order = torch.arange(n)
        if order_key is not None:
            _check_pairs(h=gaps, order_key=order_key)
            keys = order_key if all_gather is None else all_gather(order_key)
            order = torch.argsort(keys.cpu(), stable=True)
        a = a[order]  # canonical order; position j holds global pair order[j]

        # 2. EMA update before use (training only); eval only reads the EMAs
        if self.training:
            batch_std = a.std() if n > 1 else a.new_zeros(())  # unbiased; undefined for one pair -> 0
            mu_new = self.momentum * self.gap_mean.double().cpu() + (1 - self.momentum) * a.mean()
            s_new = self.momentum * self.gap_std.double().cpu() + (1 - self.momentum) * batch_std
            self.gap_mean.copy_(mu_new)
            self.gap_std.copy_(s_new)
            self.step.add_(1)
        mu = self.gap_mean.detach().double().cpu()
        s = self.gap_std.detach().double().cpu()

        # 3. Gaussian filter (uniform while s <= eps), rank-identical draw without replacement
        if s.item() <= self.eps:
            p = torch.ones_like(a)
        else:
            log_p = -0.5 * ((a - mu) / s) ** 2
            # rescale so the largest weight is 1, and keep far-out pairs at a tiny positive weight, so that drawing
            # N_kept indices without replacement is always possible
            p = torch.exp(log_p - log_p.max()).clamp(min=torch.finfo(torch.float64).tiny)
        n_kept = max(1, int(n * (1 - self.rho)))
        idx = torch.multinomial(p, n_kept, replacement=False, generator=self._generator(int(self.step.item())))
        kept_sorted = torch.zeros(n, dtype=torch.bool)
        kept_sorted[idx] = True
        mask_global = torch.zeros(n, dtype=torch.bool)
        mask_global[order[idx]] = True

        # 4. batch beta from the kept gaps, clamped and detached
        beta_batch = self.beta0 * (1 + self.alpha * (a[kept_sorted].mean() - mu))
        beta_batch = beta_batch.clamp(min=self.min_beta)

        mask = mask_global[rank * b : (rank + 1) * b]
        return BetaDPOSelection(mask=mask, beta=beta_batch, gap_mean=mu, gap_std=s, n=n, n_kept=n_kept)


# ----------------------------------------------------------------------------------------------------------------------
# more per-pair baselines: conservative and robust DPO, ODPO, margin-target regression, the SLiC hinge,
# the RPO NLL term and a generic per-pair weight column

OdpoOffset = Literal["linear", "log"]
ODPO_OFFSETS: tuple[str, ...] = ("linear", "log")


def _check_nonnegative_finite(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {name}={value!r}")


def cdpo_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float,
) -> Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"), shape (B,):

        l_i = -(1 - eps) log sigma(beta h_i) - eps log sigma(-beta h_i),    eps = label_smoothing in [0, 0.5]

    DPO's cross-entropy against a label that is right with probability 1 - eps. eps = 0 is ``dpo_losses`` exactly;
    for 0 < eps < 0.5 the minimiser is the finite target beta h* = log((1 - eps) / eps) (like IPO, it stops pushing
    margins to infinity); eps = 0.5 pulls every h to 0 (the labels are ignored). Both terms are written with
    logsigmoid (exact at any |beta h|), in the input dtype like ``dpo_losses``.
    """
    _check_positive(beta=beta)
    if not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got label_smoothing={label_smoothing!r}")
    h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    x = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def rdpo_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float,
) -> Tensor:
    """Robust DPO (Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO"), shape (B,):

        l_i = [(1 - eps) (-log sigma(beta h_i)) - eps (-log sigma(-beta h_i))] / (1 - 2 eps),    eps in [0, 0.5)

    eps = label_smoothing is the rate at which preference labels are flipped. The loss is an unbiased estimate of
    DPO's loss on the true labels: (1 - eps) l(h) + eps l(-h) = -log sigma(beta h). eps = 0 is ``dpo_losses`` exactly;
    eps = 0.5 divides by zero (labels flipped at rate 1/2 carry no information) and raises. Unlike DPO and cDPO the
    per-pair loss is not bounded below: for beta h -> +inf it tends to -eps beta h / (1 - 2 eps), so per-pair values
    can be negative. Computed with logsigmoid in the input dtype, like ``dpo_losses``.
    """
    _check_positive(beta=beta)
    if label_smoothing == 0.5:
        raise ValueError(
            "label_smoothing=0.5 makes rDPO divide by zero (1 - 2 * label_smoothing = 0): labels flipped at rate 0.5 "
            "carry no information about the preference; use label_smoothing in [0, 0.5)"
        )
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing!r}")
    h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    x = beta * h
    eps = label_smoothing
    return ((1.0 - eps) * -F.logsigmoid(x) - eps * -F.logsigmoid(-x)) / (1.0 - 2.0 * eps)


def odpo_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    margins: Tensor,
    *,
    beta: float = 0.1,
    alpha: float,
    offset: OdpoOffset = "linear",
) -> Tensor:
    """ODPO (Amini, Vieira & Cotterell 2024, "Direct Preference Optimization with an Offset"), shape (B,):

        l_i = -log sigma(beta h_i - Delta_i),    Delta_i = alpha m_i        (offset="linear", the default)
                                                 Delta_i = alpha log(m_i)   (offset="log", the paper's form)

    The chosen completion must beat the rejected one by at least the offset Delta_i. With "linear", m is a
    Bradley-Terry logit margin and may have any sign; "log" is the paper's offset on positive score differences and
    requires every m_i > 0 (else ValueError; this check reads the margins back to the host). alpha = 0 is
    ``dpo_losses``. The margins are detached and, as in ``madpo_weights``, taken in float32 (float64 for float64
    margins), so the losses are at least float32.
    """
    if offset not in ODPO_OFFSETS:
        raise ValueError(f"offset must be one of {ODPO_OFFSETS}, got offset={offset!r}")
    _check_positive(beta=beta)
    _check_nonnegative_finite(alpha=alpha)
    h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_pairs(policy_chosen_logps=policy_chosen_logps, margins=margins)
    m = margins.detach().to(_weight_dtype(margins))
    if offset == "log":
        n_bad = int((~(m > 0)).sum())
        if n_bad:
            raise ValueError(
                f"offset='log' takes log(margins), so every margin must be > 0: {n_bad} of {m.numel()} margins are "
                "<= 0 (or NaN); use offset='linear' for signed Bradley-Terry margins"
            )
        delta = alpha * torch.log(m)
    else:
        delta = alpha * m
    return -F.logsigmoid(beta * h - delta)


def margin_target_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    margins: Tensor,
    *,
    beta: float = 0.1,
    eta: float,
) -> Tensor:
    """Margin-target regression, shape (B,): l_i = (beta h_i - eta m_i)^2.

    The squared-distance form of reward-aware preference optimisation (NVIDIA 2024, "Nemotron-4 340B Technical
    Report"): the implicit reward margin beta h regresses on the scaled reward-model margin eta m. eta = 0 is
    (beta h)^2; a constant m = 1 with eta = 1/2 is beta^2 times ``ipo_losses``. The margins are detached and taken in
    float32 (float64 for float64 margins), as in ``madpo_weights``, so the losses are at least float32.
    """
    _check_positive(beta=beta)
    _check_nonnegative_finite(eta=eta)
    h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_pairs(policy_chosen_logps=policy_chosen_logps, margins=margins)
    m = margins.detach().to(_weight_dtype(margins))
    return (beta * h - eta * m) ** 2


def hinge_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """SLiC hinge (Zhao et al. 2023, "SLiC-HF"), with the reference-normalised margin, shape (B,):

        l_i = max(0, 1 - beta h_i)

    (the form used by RSO, Liu et al. 2024, and TRL's ``loss_type="hinge"``). The gradient w.r.t. h is -beta for
    beta h < 1 and 0 for beta h > 1 (0 at the kink, ReLU's subgradient). Computed in the input dtype.
    """
    _check_positive(beta=beta)
    h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return F.relu(1.0 - beta * h)


def chosen_nll(chosen_logps: Tensor, chosen_token_counts: Tensor) -> Tensor:
    """The RPO term (Pang et al. 2024, "Iterative Reasoning Preference Optimization"), shape (B,):

        nll_i = -log pi(y_w|x)_i / n_i,    n_i = tokens of the chosen completion (>= 1)

    ``chosen_logps`` are the policy's summed log-probs of the chosen completion and ``chosen_token_counts`` the tokens
    they were summed over. The RPO objective adds it to a preference loss pair by pair, then reduces with the mean:
        losses = dpo_losses(pc, pr, rc, rr, beta=beta) + alpha * chosen_nll(pc, n_c)     (any per-pair loss above)
    The counts are detached; the result is computed in float32 (float64 for float64 log-probs), so a bf16 log-prob
    is not divided by a count rounded to bf16.
    """
    _check_pairs(chosen_logps=chosen_logps, chosen_token_counts=chosen_token_counts)
    dtype = _weight_dtype(chosen_logps)
    n = chosen_token_counts.detach().to(dtype)
    n_bad = int((~(torch.isfinite(n) & (n >= 1))).sum())
    if n_bad:
        raise ValueError(
            f"chosen_token_counts must be finite and >= 1: {n_bad} of {n.numel()} entries are < 1, NaN or inf"
        )
    return -chosen_logps.to(dtype) / n


def weighted(losses: Tensor, weights: Tensor) -> Tensor:
    """l_i * w_i, shape (B,): a per-pair weight column (finite, >= 0) multiplying each pair's loss, as MADPO's w does.

    The weights are detached (data, like MADPO's w: no gradient flows into them) and taken in float32 (float64 for
    float64 weights), as in ``madpo_weights``. The batch loss stays the plain mean (not divided by sum(w)).
    """
    _check_pairs(losses=losses, weights=weights)
    w = weights.detach().to(_weight_dtype(weights))
    n_nonfinite = int((~torch.isfinite(w)).sum())
    if n_nonfinite:
        raise ValueError(f"weights must be finite: {n_nonfinite} of {w.numel()} entries are NaN or inf")
    n_negative = int((w < 0).sum())
    if n_negative:
        raise ValueError(f"weights must be >= 0: {n_negative} of {w.numel()} entries are negative")
    return losses * w
