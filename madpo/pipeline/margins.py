"""Robustness runs: the reward model's training margins, perturbed before the policy reads them; and synthetic
margins in place of the reward model's, of a chosen quality (`synthetic_margins`).

rm_margin' = s * (rm_margin + noise), noise ~ N(0, noise_std^2), s = -1 on a seeded fraction `flip_fraction` of the
pairs, else +1: how much MADPO's weighting degrades when the reward model is noisier or wrong on some pairs. The
perturbation is the pipeline's experiment, not a data option: the library's DataModule reads `rm_margin` as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SEED_OFFSET = 7919
"""Added to the run's seed for the perturbation's generator: its own stream, apart from the training shuffle."""


def perturb_margins(
    margins: Sequence[float] | torch.Tensor, *, noise_std: float, flip_fraction: float, seed: int
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """`(perturbed (N,) float64, stats)`: Gaussian noise of std `noise_std` added to every margin, then the sign of
    `round(flip_fraction * N)` seeded pairs flipped. One generator seeded `seed + 7919` draws the noise first, then
    the pairs to flip, so a run's perturbed margins depend only on (margins, noise_std, flip_fraction, seed).

    `stats`: `noise_std`, `flipped` (the number of pairs flipped) and `mean_abs_change` (mean |perturbed - margin|).
    """
    if noise_std < 0 or not 0.0 <= flip_fraction <= 1.0:
        raise ValueError(f"noise_std must be >= 0 and flip_fraction in [0, 1]; got {noise_std}, {flip_fraction}")
    rm_margin = torch.as_tensor(margins, dtype=torch.float64)
    n = len(rm_margin)
    generator = torch.Generator().manual_seed(seed + SEED_OFFSET)
    noise = torch.randn(n, generator=generator, dtype=torch.float64) * noise_std
    n_flip = round(flip_fraction * n)
    flip = torch.zeros(n, dtype=torch.bool)
    flip[torch.randperm(n, generator=generator)[:n_flip]] = True
    perturbed = torch.where(flip, -(rm_margin + noise), rm_margin + noise)
    stats = {
        "noise_std": noise_std,
        "flipped": n_flip,
        "mean_abs_change": float((perturbed - rm_margin).abs().mean()) if n else 0.0,
    }
    return perturbed, stats


SYNTHETIC_SEED_OFFSET = 104729
"""Added to the run's seed for the synthetic margins' generator: a stream apart from the training shuffle and from
`perturb_margins` (which may perturb the synthetic margins afterwards)."""
SYNTHETIC_SOURCES = ("oracle", "random")


def synthetic_margins(
    oracle_gaps: Sequence[float] | np.ndarray,
    *,
    source: str,
    noise_std: float,
    seed: int,
    scale: float | None = None,
    stream: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """`(margins (N,) float64, stats)`: margins of a known quality for pairs with oracle gaps g = oracle_chosen −
    oracle_rejected, in place of a reward model's, so that MADPO can be measured against margin quality alone.

    - `oracle`: m = g + ε, ε ~ N(0, noise_std²). The labels are Bradley–Terry draws from g (docs/method.md eq. (36)),
      so noise_std = 0 is the perfect reward model and growing noise_std degrades it towards chance.
    - `random`: m ~ N(0, s²) independent of the pair, s = `scale` (None: the population sd of `oracle_gaps`): a reward
      model at chance on the same scale as the oracle's, so that MADPO's weight regions fill as they would.

    One generator, seeded from (`seed` + SYNTHETIC_SEED_OFFSET, `stream`), draws the N normals; `stream` keeps two
    splits of one run (train 0, validation 1) apart. `stats`: `source`, `noise_std`, `scale` (random only), `n`,
    `mean`, `sd` of the margins.
    """
    if source not in SYNTHETIC_SOURCES:
        raise ValueError(f"synthetic_margins: source={source!r}, expected one of {list(SYNTHETIC_SOURCES)}")
    if not noise_std >= 0 or (noise_std and source != "oracle"):
        raise ValueError(f"synthetic_margins: noise_std={noise_std} must be >= 0, and 0 unless source='oracle'")
    gaps = np.asarray(oracle_gaps, dtype=np.float64).reshape(-1)
    if not np.isfinite(gaps).all():
        raise ValueError(f"synthetic_margins: oracle gap {int(np.flatnonzero(~np.isfinite(gaps))[0])} is not finite")
    n = gaps.size
    # SeedSequence takes non-negative integers: a negative seed maps to its two's complement, distinct from others
    rng = np.random.default_rng([(seed + SYNTHETIC_SEED_OFFSET) & (2**64 - 1), stream])
    stats: dict[str, Any] = {"source": source, "noise_std": noise_std}
    if source == "oracle":
        margins = gaps + rng.standard_normal(n) * noise_std if noise_std else gaps.copy()
    else:
        s = (float(gaps.std()) if n else 0.0) if scale is None else float(scale)
        margins = rng.standard_normal(n) * s
        stats["scale"] = s
    stats.update({"n": n, "mean": float(margins.mean()) if n else 0.0, "sd": float(margins.std()) if n else 0.0})
    return margins, stats
