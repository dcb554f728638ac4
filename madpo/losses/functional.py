"""Preference-optimisation losses: MADPO, DPO, IPO, beta-DPO and the Bradley-Terry reward-model loss.

Pure maths on tensors. Every function takes per-pair tensors of shape (B,) and returns per-pair values of shape (B,);
the caller reduces with ``.mean()`` (with equal per-rank batches, DDP's average of per-rank means is the global mean).
Formulas follow ``docs/method.md`` (eq. (1)–(30)); the equation each function implements sits in its docstring.

Notation:
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]    implicit margin
    m = r(x, y_w) - r(x, y_l)                                                        reward-model margin (detached)
"""

import math
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
# eq. (2): implicit margin


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
# eq. (13)–(19): MADPO


def amplification_coefficient(
    abs_margins: Tensor,
    *,
    c_max: float = 4.0,
    c_min: float | None = None,
    lam: float = 1.0,
    tau: float = DEFAULT_TAU,
) -> Tensor:
    """Eq. (14)–(15): c(|m|) = c_min + (c_max - c_min) / (1 + K exp(lam (|m| - tau))),  K = (c_max - 1) / (1 - c_min).

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
    """Eq. (13): l_i = w(m_i) * (-log sigma(beta h_i)); returns (losses, weights), both (B,).

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
    """Eq. (13): l_i = w(m_i) * (-log sigma(beta h_i)), shape (B,). ``madpo_losses_and_weights`` also gives w."""
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
# eq. (4)–(6), (21): baselines and the reward model


def dpo_losses(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Tensor:
    """Eq. (4): l_i = -log sigma(beta h_i) = softplus(-beta h_i), shape (B,).

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
    """Eq. (5): l_i = (h_i - 1 / (2 beta))^2, shape (B,).

    The caller chooses the form: summed log-probs (paper parity) or log-probs divided by the completion token count.
    """
    _check_positive(beta=beta)
    h = implicit_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def bradley_terry_losses(
    chosen_rewards: Tensor, rejected_rewards: Tensor, *, target_margin: float | Tensor | None = None
) -> Tensor:
    """Eq. (21): l_i = -log sigma(r_w - r_l - target_margin), shape (B,). ``target_margin`` is a float or (B,)."""
    if isinstance(target_margin, Tensor):
        _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, target_margin=target_margin)
    else:
        _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    logits = chosen_rewards - rejected_rewards
    if target_margin is not None:
        logits = logits - target_margin
    return -F.logsigmoid(logits)


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
