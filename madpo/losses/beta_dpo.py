"""beta-DPO (Wu et al. 2024): a batch-level beta and a Gaussian filter on the implicit margin, with EMA state in
buffers, as in the official code, with the port pitfalls handled; and the MADPO repository's variant of it, which
produced the MADPO paper's beta-DPO row."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from madpo.losses.functional import _check_pairs, _check_positive, _weight_dtype, implicit_margin

BETA_DPO_VARIANTS = ("official", "madpo_repo")
REPO_EPS = 1e-6
"""The MADPO repository adds this to the batch std and to the filter's denominator."""


@dataclass
class BetaDPOOutput:
    """What ``BetaDPO.forward`` returns. All 0-dim values are detached."""

    losses: Tensor  # (B,) this rank's per-pair losses; see BetaDPO.forward for the reduction convention
    mask: Tensor  # (B,) bool, this rank's slice of the global kept-pair mask
    beta: Tensor  # 0-dim, the effective beta_batch
    gap_mean: Tensor  # 0-dim, EMA mu used for this batch
    gap_std: Tensor  # 0-dim, EMA s used for this batch
    kept_fraction: Tensor  # 0-dim, N_kept / N_global
    clamped: Tensor  # 0-dim, 1.0 when the raw beta_batch was below min_beta (see BetaDPOSelection), else 0.0


@dataclass
class BetaDPOSelection:
    """What ``BetaDPO.select`` decides for one training step (CPU, float64, detached)."""

    mask: Tensor  # (B,) bool, this rank's slice of the global kept-pair mask
    beta: Tensor  # 0-dim beta_batch
    gap_mean: Tensor  # 0-dim EMA mu used
    gap_std: Tensor  # 0-dim EMA s used
    n: int  # pairs in the global batch
    n_kept: int  # pairs kept
    clamped: bool = False  # the raw beta_batch was below min_beta: raised to it (official), left as is (madpo_repo)


class BetaDPO(torch.nn.Module):
    """beta-DPO: a batch-level beta and a Gaussian filter on the implicit margin, with EMA state in buffers.

    Per training step (docs/method.md eq. (7)–(12)), with A_i = h_i detached and not beta-scaled, gathered over ranks:
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
    Variant ``madpo_repo`` (the MADPO repository's beta-DPO, behind the MADPO paper's beta-DPO row), per optimiser step:
        A_i = beta0 h_i;  mu, s start at (0, 1);  s <- momentum s + (1 - momentum) (std(A) + 1e-6)
        p_i = exp(-0.5 ((A_i - mu) / (s + 1e-6))^2)
        beta_batch = beta0 (1 + alpha (mean_all(A) - mu))        (all pairs, before filtering; not clamped)
    The gap is then in units of beta0 nats, so beta_batch moves beta0 times less per nat of gap spread.

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
        variant: Literal["official", "madpo_repo"] = "official",
    ) -> None:
        super().__init__()
        _check_positive(beta=beta, min_beta=min_beta)
        if variant not in BETA_DPO_VARIANTS:
            raise ValueError(f"variant must be one of {BETA_DPO_VARIANTS}, got variant={variant!r}")
        if not 0 <= rho < 1:
            raise ValueError(f"rho (fraction of pairs filtered out) must be in [0, 1), got rho={rho!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got eps={eps!r}")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got alpha={alpha!r}")
        self.beta0, self.alpha, self.rho, self.momentum = beta, alpha, rho, momentum
        self.min_beta, self.eps, self.seed, self.variant = min_beta, eps, int(seed), variant
        self.register_buffer("gap_mean", torch.zeros((), dtype=torch.float32))
        # the MADPO repository starts the scale EMA at 1, so its first filter is not peaked
        self.register_buffer("gap_std", torch.full((), 1.0 if variant == "madpo_repo" else 0.0, dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        shown = f"beta={self.beta0}, alpha={self.alpha}, rho={self.rho}, momentum={self.momentum}, seed={self.seed}"
        return shown if self.variant == "official" else f"{shown}, variant={self.variant!r}"

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
            clamped=torch.tensor(float(selection.clamped), device=h.device, dtype=dtype),
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

        # 1. gap A: detached, gathered over ranks, not beta-scaled (official) or scaled by beta0 (madpo_repo);
        # statistics on CPU in float64 (rank-identical)
        a_local = gaps.detach()
        a_global = a_local if all_gather is None else all_gather(a_local)
        if a_global.dim() != 1 or b == 0 or a_global.shape[0] % b != 0:
            raise ValueError(f"all_gather must return [world * B] with B={b}, got {list(a_global.shape)}")
        n = a_global.shape[0]
        if not 0 <= rank < n // b:
            raise ValueError(f"rank must be in [0, {n // b}) for a gathered batch of {n} and B={b}, got rank={rank}")
        a = a_global.to(device="cpu", dtype=torch.float64)
        repo = self.variant == "madpo_repo"
        if repo:
            a = self.beta0 * a
        order = torch.arange(n)
        if order_key is not None:
            _check_pairs(h=gaps, order_key=order_key)
            keys = order_key if all_gather is None else all_gather(order_key)
            order = torch.argsort(keys.cpu(), stable=True)
        a = a[order]  # canonical order; position j holds global pair order[j]

        # 2. EMA update before use (training only); eval only reads the EMAs
        if self.training:
            batch_std = a.std() if n > 1 else a.new_zeros(())  # unbiased; undefined for one pair -> 0
            if repo:
                batch_std = batch_std + REPO_EPS
            mu_new = self.momentum * self.gap_mean.double().cpu() + (1 - self.momentum) * a.mean()
            s_new = self.momentum * self.gap_std.double().cpu() + (1 - self.momentum) * batch_std
            self.gap_mean.copy_(mu_new)
            self.gap_std.copy_(s_new)
            self.step.add_(1)
        mu = self.gap_mean.detach().double().cpu()
        s = self.gap_std.detach().double().cpu()

        # 3. Gaussian filter (uniform while s <= eps), rank-identical draw without replacement
        if s.item() <= self.eps and not repo:
            p = torch.ones_like(a)
        else:
            log_p = -0.5 * ((a - mu) / (s + REPO_EPS if repo else s)) ** 2
            # rescale so the largest weight is 1, and keep far-out pairs at a tiny positive weight, so that drawing
            # N_kept indices without replacement is always possible
            p = torch.exp(log_p - log_p.max()).clamp(min=torch.finfo(torch.float64).tiny)
        n_kept = max(1, int(n * (1 - self.rho)))
        idx = torch.multinomial(p, n_kept, replacement=False, generator=self._generator(int(self.step.item())))
        kept_sorted = torch.zeros(n, dtype=torch.bool)
        kept_sorted[idx] = True
        mask_global = torch.zeros(n, dtype=torch.bool)
        mask_global[order[idx]] = True

        # 4. batch beta, detached: from the kept gaps and clamped (official), from all gaps and not clamped (madpo_repo)
        raw_beta = self.beta0 * (1 + self.alpha * ((a.mean() if repo else a[kept_sorted].mean()) - mu))
        beta_batch = raw_beta if repo else raw_beta.clamp(min=self.min_beta)

        mask = mask_global[rank * b : (rank + 1) * b]
        clamped = bool(raw_beta < self.min_beta)
        return BetaDPOSelection(mask=mask, beta=beta_batch, gap_mean=mu, gap_std=s, n=n, n_kept=n_kept, clamped=clamped)
