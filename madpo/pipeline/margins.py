"""Robustness runs: the reward model's training margins, perturbed before the policy reads them.

rm_margin' = s * (rm_margin + noise), noise ~ N(0, noise_std^2), s = -1 on a seeded fraction `flip_fraction` of the
pairs, else +1: how much MADPO's weighting degrades when the reward model is noisier or wrong on some pairs. The
perturbation is the pipeline's experiment, not a data option: the library's DataModule reads `rm_margin` as given.
"""

from __future__ import annotations

from collections.abc import Sequence

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
