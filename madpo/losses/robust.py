"""More pairwise objectives as components: conservative and robust DPO, ODPO, margin-target regression, the SLiC hinge,
and `WithChosenNLL`, RPO's NLL term added to any of them (docs/method.md eq. (23)–(29)).

Each class is its pure function in `madpo.losses.functional` plus TRL's pair metrics; the ones that read the reward
model's margin declare `rm_margin` (like `MADPOLoss`) and log `rm/margin_mean`. A per-pair `weight` column of the data
multiplies any pairwise loss (eq. (30)); `PolicyLightningModule.compute` applies it, not these classes.

    loss:
      class_path: madpo.losses.WithChosenNLL      # RPO: DPO + 1.0 * token-mean NLL of the chosen completion
      init_args:
        alpha: 1.0
        loss: {class_path: madpo.losses.DPOLoss, init_args: {beta: 0.1}}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from madpo.losses.components import (
    PAIR_METRICS,
    LogProbs,
    LossContext,
    LossOutput,
    PreferenceLoss,
    _pair_args,
    build_loss,
    loss_config,
    pair_metrics,
)
from madpo.losses.functional import (
    OdpoOffset,
    _check_nonnegative_finite,
    cdpo_losses,
    chosen_nll,
    hinge_losses,
    margin_target_losses,
    odpo_losses,
    rdpo_losses,
)

if TYPE_CHECKING:
    from madpo.data.requirements import DataRequirements

MARGIN_METRICS: tuple[str, ...] = PAIR_METRICS + ("rm/margin_mean",)


def _zeros() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four one-pair log-prob tensors: calling the pure function on them validates a loss's options at __init__."""
    return tuple(torch.zeros(1) for _ in range(4))  # type: ignore[return-value]


def _margins(batch: dict[str, Tensor], who: str) -> Tensor:
    if "rm_margin" not in batch:
        raise ValueError(f"{who} needs rm_margin in the batch: pass --data.reward_model or an rm_margin column")
    return batch["rm_margin"]


class _MarginLoss(PreferenceLoss):
    """A pairwise loss that reads the reward model's margin of each pair (`rm_margin`)."""

    metric_names = MARGIN_METRICS

    def data_requirements(self) -> DataRequirements:
        from madpo.data.requirements import DataRequirements

        return DataRequirements(pairs=True, reference_logps=True, rm_margin=True)


class CDPOLoss(PreferenceLoss):
    """Conservative DPO (cDPO), docs/method.md eq. (23): −(1−ε) log σ(β h) − ε log σ(−β h), DPO against a label that
    is right with probability 1 − ε. ε = 0 is DPOLoss.

    Args:
        beta: DPO temperature β.
        label_smoothing: ε in [0, 0.5], the probability that a preference label is wrong.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing
        cdpo_losses(*_zeros(), beta=beta, label_smoothing=label_smoothing)  # validate the options now

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        losses = cdpo_losses(*_pair_args(policy, reference), beta=self.beta, label_smoothing=self.label_smoothing)
        return LossOutput(losses, pair_metrics(self.beta, policy, reference))


class RDPOLoss(PreferenceLoss):
    """Robust DPO (rDPO), docs/method.md eq. (24): [(1−ε)(−log σ(β h)) − ε(−log σ(−β h))] / (1 − 2ε), an unbiased
    estimate of DPO's loss on labels flipped at rate ε (eq. (25)); per-pair values can be negative. ε = 0 is DPOLoss.

    Args:
        beta: DPO temperature β.
        label_smoothing: ε in [0, 0.5), the rate at which preference labels are flipped.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.beta, self.label_smoothing = beta, label_smoothing
        rdpo_losses(*_zeros(), beta=beta, label_smoothing=label_smoothing)

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        losses = rdpo_losses(*_pair_args(policy, reference), beta=self.beta, label_smoothing=self.label_smoothing)
        return LossOutput(losses, pair_metrics(self.beta, policy, reference))


class ODPOLoss(_MarginLoss):
    """ODPO, DPO with an offset, docs/method.md eq. (26): −log σ(β h − Δ), Δ = α·m (linear) or α·log m (log), m the
    reward model's margin of the pair. α = 0 is DPOLoss.

    Args:
        beta: DPO temperature β.
        alpha: Offset scale α (≥ 0).
        offset: 'linear' (Δ = α m, any sign of m) or 'log' (Δ = α log m, the paper's form; every m must be > 0).
    """

    def __init__(self, beta: float = 0.1, alpha: float = 1.0, offset: OdpoOffset = "linear") -> None:
        super().__init__()
        self.beta, self.alpha, self.offset = beta, alpha, offset
        odpo_losses(*_zeros(), torch.ones(1), beta=beta, alpha=alpha, offset=offset)

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        margins = _margins(batch, "ODPOLoss")
        losses = odpo_losses(
            *_pair_args(policy, reference), margins, beta=self.beta, alpha=self.alpha, offset=self.offset
        )
        return LossOutput(losses, {"rm/margin_mean": margins, **pair_metrics(self.beta, policy, reference)})


class MarginTargetLoss(_MarginLoss):
    """Margin-target regression, docs/method.md eq. (27): (β h − η m)², the implicit reward margin β h regressed onto
    the scaled reward-model margin η m.

    Args:
        beta: DPO temperature β.
        eta: Scale η (≥ 0) of the reward model's margin m.
    """

    def __init__(self, beta: float = 0.1, eta: float = 1.0) -> None:
        super().__init__()
        self.beta, self.eta = beta, eta
        margin_target_losses(*_zeros(), torch.ones(1), beta=beta, eta=eta)

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        margins = _margins(batch, "MarginTargetLoss")
        losses = margin_target_losses(*_pair_args(policy, reference), margins, beta=self.beta, eta=self.eta)
        return LossOutput(losses, {"rm/margin_mean": margins, **pair_metrics(self.beta, policy, reference)})


class HingeLoss(PreferenceLoss):
    """SLiC hinge, docs/method.md eq. (28): max(0, 1 − β h) (RSO's form, TRL's loss_type='hinge').

    Args:
        beta: Scale β of the implicit margin: pairs with β h ≥ 1 contribute nothing.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta
        hinge_losses(*_zeros(), beta=beta)

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        losses = hinge_losses(*_pair_args(policy, reference), beta=self.beta)
        return LossOutput(losses, pair_metrics(self.beta, policy, reference))


class WithChosenNLL(PreferenceLoss):
    """RPO's NLL term added to any preference loss, docs/method.md eq. (29): ℓ_i + α·nll_i, nll_i the token-mean
    negative log-likelihood of the chosen completion (logged as `nll_loss`). `WithChosenNLL(DPOLoss(), 1.0)` is RPO.

    The wrapped loss keeps its options, data requirements and metrics; when it returns its own reduced loss
    (β-DPO under gradient accumulation, SFT), α·mean(nll) is added to that. A `weight` column multiplies the sum.

    Args:
        loss: The preference loss to add the NLL term to, by class_path (e.g. madpo.losses.DPOLoss).
        alpha: Weight α (≥ 0) of the chosen completion's token-mean NLL; 0 is the wrapped loss alone.
    """

    def __init__(self, loss: PreferenceLoss, alpha: float = 1.0) -> None:
        super().__init__()
        _check_nonnegative_finite(alpha=alpha)
        self.loss = build_loss(loss)  # a checkpoint's hparams hold the inner loss as {class_path, init_args}
        self.alpha = alpha
        self.metric_names = tuple(dict.fromkeys((*self.loss.metric_names, "nll_loss")))

    def init_args(self) -> dict[str, Any]:
        return {"loss": loss_config(self.loss), "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha!r}"

    def data_requirements(self) -> DataRequirements:
        return self.loss.data_requirements()

    def epoch_histograms(self, margins: Tensor) -> dict[str, Tensor]:
        return self.loss.epoch_histograms(margins)

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        out = self.loss(policy, reference, batch, ctx)
        nll = chosen_nll(policy.chosen, policy.chosen_tokens)
        losses = out.losses + self.alpha * nll
        loss = None if out.loss is None else out.loss + self.alpha * nll.mean()
        return LossOutput(losses, {**out.metrics, "nll_loss": nll.detach()}, dict(out.scalars), loss=loss)


__all__ = ["CDPOLoss", "HingeLoss", "MarginTargetLoss", "ODPOLoss", "RDPOLoss", "WithChosenNLL"]
