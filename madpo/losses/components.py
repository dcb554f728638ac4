"""Losses as components: a `PreferenceLoss` is an `nn.Module` the policy module calls once per step.

The module runs the policy (and the reference) and hands over summed completion log-probs; the loss turns them into
per-pair losses and the metrics it logs, and declares what it needs from the data. A new method is one subclass here
(or in any importable module) plus a YAML naming it:

    model:
      class_path: madpo.PolicyLightningModule
      init_args:
        loss:
          class_path: madpo.losses.MADPOLoss
          init_args: {beta: 0.1, c_max: 4.0}

Every `__init__` argument of a loss is kept as an attribute of the same name: `init_args()` reads them back, so the
checkpoint and the pipeline's cache keys record the loss as its class path plus those options.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from madpo.losses.beta_dpo import BetaDPO, BetaDPOSelection
from madpo.losses.functional import (
    Variant,
    _check_positive,
    dpo_losses,
    implicit_margin,
    ipo_losses,
    madpo_losses_and_weights,
    madpo_weights,
)

if TYPE_CHECKING:  # the data layer pulls in datasets/transformers; `import madpo.losses` stays torch-only
    from madpo.data.requirements import DataRequirements

PAIR_METRICS: tuple[str, ...] = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
"""What every pairwise loss logs (TRL's names)."""


@dataclass
class LogProbs:
    """The policy's summed completion log-probs and the token counts they sum over, (B,) each. `rejected*` are None
    for single completions (SFT)."""

    chosen: Tensor
    chosen_tokens: Tensor
    rejected: Tensor | None = None
    rejected_tokens: Tensor | None = None


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class LossContext:
    """What a loss may need beyond its batch: the stage, the process group and the optimiser step.

    `accumulate` is the number of micro-batches per optimiser step on a training step when it is > 1, else 0. Then
    `step_key` names the optimiser step, `step_rows()` returns this rank's rows of the whole step (all micro-batches)
    and `step_logps()` scores them without gradient: (row index, policy log-probs, (reference chosen, rejected)).
    """

    stage: str
    world_size: int = 1
    rank: int = 0
    gather: Callable[[Tensor], Tensor] = _identity
    """All-gather a per-pair tensor into (world * B,) in rank order (identity on one process)."""
    global_sum: Callable[[Tensor], Tensor] = _identity
    accumulate: int = 0
    step_key: Hashable = None
    step_rows: Callable[[], dict[str, Tensor]] | None = None
    step_logps: Callable[[], tuple[Tensor, LogProbs, tuple[Tensor, Tensor]]] | None = None


@dataclass
class LossOutput:
    """Per-pair losses (logged as `loss`), per-pair metrics ((B,) each, gathered over ranks) and 0-dim scalars.
    `loss` is the value to backpropagate when it is not `losses.mean()`."""

    losses: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, Tensor] = field(default_factory=dict)
    loss: Tensor | None = None


class PreferenceLoss(nn.Module):
    """Base class of the policy's objectives: `forward(policy, reference, batch, ctx) -> LossOutput`.

    `metric_names` lists the per-pair metrics it logs (names ending in _min/_max reduce with min/max);
    `data_requirements()` what it needs from the data. A stateful loss keeps its state in buffers, so the state is in
    the checkpoint.
    """

    metric_names: tuple[str, ...] = PAIR_METRICS

    def data_requirements(self) -> DataRequirements:
        """Preference pairs and reference log-probs (the module drops the latter with an online reference)."""
        from madpo.data.requirements import DataRequirements

        return DataRequirements(pairs=True, reference_logps=True, rm_margin=False)

    def forward(
        self,
        policy: LogProbs,
        reference: tuple[Tensor, Tensor] | None,
        batch: dict[str, Tensor],
        ctx: LossContext,
    ) -> LossOutput:
        raise NotImplementedError

    def epoch_histograms(self, margins: Tensor) -> dict[str, Tensor]:
        """Extra TensorBoard histograms over the training set's reward-model margins, once per epoch."""
        return {}

    def init_args(self) -> dict[str, Any]:
        """The `__init__` arguments, read back from the attributes of the same names."""
        out = {}
        for name, p in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if not hasattr(self, name):
                raise TypeError(f"{type(self).__name__} must keep its __init__ argument {name!r} as self.{name}")
            out[name] = getattr(self, name)
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())


def class_path(loss: PreferenceLoss | type) -> str:
    """`madpo.losses.<Name>` for this package's losses (their public path), else `<module>.<qualname>`."""
    cls = loss if isinstance(loss, type) else type(loss)
    if cls.__module__.startswith("madpo.losses."):
        return f"madpo.losses.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def loss_config(loss: PreferenceLoss) -> dict[str, Any]:
    """`{"class_path": ..., "init_args": {...}}`: jsonargparse's form, plain data (a checkpoint's hparams)."""
    return {"class_path": class_path(loss), "init_args": dict(loss.init_args())}


def build_loss(config: PreferenceLoss | dict[str, Any]) -> PreferenceLoss:
    """A loss from `loss_config`'s form (or jsonargparse's Namespace of it); a loss object is returned as it is."""
    if isinstance(config, PreferenceLoss):
        return config
    if not isinstance(config, dict) and hasattr(config, "as_dict"):
        config = config.as_dict()
    if not isinstance(config, dict) or "class_path" not in config:
        raise TypeError(f"loss must be a PreferenceLoss or {{class_path, init_args}}, got {config!r}")
    module, _, name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, PreferenceLoss)):
        raise TypeError(f"{config['class_path']} is not a PreferenceLoss")
    return cls(**dict(config.get("init_args") or {}))


def with_options(loss: PreferenceLoss, **changes: Any) -> PreferenceLoss:
    """A new loss of the same class with some options changed."""
    return type(loss)(**{**loss.init_args(), **changes})


def pair_metrics(beta: float, policy: LogProbs, reference: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """TRL's implicit-reward metrics: rewards β·(log π − log π_ref) per completion, their accuracy and margin."""
    assert policy.rejected is not None
    ref_chosen, ref_rejected = reference
    chosen_rewards = beta * (policy.chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy.rejected - ref_rejected).detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
    }


def _pair_args(policy: LogProbs, reference: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    assert policy.rejected is not None
    return policy.chosen, policy.rejected, reference[0], reference[1]


def _check_rows_in_step(index: Tensor, step_index: Tensor) -> None:
    if not torch.isin(index.cpu(), step_index.cpu()).all():
        raise RuntimeError("micro-batch rows are not in their optimiser step: the loader's order changed")


class SFTLoss(PreferenceLoss):
    """Supervised fine-tuning: the token-mean NLL of the completion (chosen) tokens over the optimiser step,
    Σ −log p / N, N the completion tokens of the whole step on every rank (all micro-batches, all ranks)."""

    metric_names = ("loss", "logps/chosen", "nll_per_token")

    def __init__(self) -> None:
        super().__init__()

    def data_requirements(self) -> DataRequirements:
        from madpo.data.requirements import DataRequirements

        return DataRequirements(pairs=False, reference_logps=False, rm_margin=False)

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        logps, n_tokens = policy.chosen, policy.chosen_tokens
        # DDP averages gradients over ranks and Lightning divides each micro-batch's loss by `accumulate`: divide by
        # N / (world * accumulate), N the tokens of the whole optimiser step, so the update follows the token mean.
        if ctx.accumulate:
            accumulate, step_tokens = ctx.accumulate, self._step_tokens(ctx, batch["index"], logps.device)
        else:
            accumulate, step_tokens = 1, ctx.global_sum(n_tokens.sum().float())
        loss = -logps.sum() / (step_tokens / (ctx.world_size * accumulate)).clamp_min(1.0)
        nll = -logps.detach() / n_tokens.clamp_min(1)
        return LossOutput(nll, {"logps/chosen": logps.detach(), "nll_per_token": nll}, loss=loss)

    def _step_tokens(self, ctx: LossContext, index: Tensor, device: torch.device) -> Tensor:
        """Completion tokens of the whole optimiser step on every rank, counted once per step."""
        cached = getattr(self, "_cached_step_tokens", (None, None))
        if cached[0] != ctx.step_key:
            assert ctx.step_rows is not None
            rows = ctx.step_rows()
            _check_rows_in_step(index, rows["index"])
            local = rows["completion_mask"][: rows["index"].numel(), 1:].sum().float().to(device)
            cached = (ctx.step_key, ctx.global_sum(local))
            self._cached_step_tokens = cached
        return cached[1]


class DPOLoss(PreferenceLoss):
    """DPO: −log σ(β h), h the implicit margin of the pair.

    Args:
        beta: DPO temperature β.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        _check_positive(beta=beta)
        self.beta = beta

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        losses = dpo_losses(*_pair_args(policy, reference), beta=self.beta)
        return LossOutput(losses, pair_metrics(self.beta, policy, reference))


class IPOLoss(PreferenceLoss):
    """IPO: (h − 1/(2β))², on summed log-probs (the paper's form) or length-normalised ones (TRL's).

    Args:
        beta: IPO's τ: the target margin is 1/(2β).
        length_normalize: Divide each completion's log-probs by its token count (TRL's form) instead of summing.
    """

    def __init__(self, beta: float = 0.1, length_normalize: bool = False) -> None:
        super().__init__()
        _check_positive(beta=beta)
        self.beta, self.length_normalize = beta, length_normalize

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        args = _pair_args(policy, reference)
        if self.length_normalize:
            assert policy.rejected_tokens is not None
            count_chosen, count_rejected = policy.chosen_tokens.float(), policy.rejected_tokens.float()
            args = (args[0] / count_chosen, args[1] / count_rejected, args[2] / count_chosen, args[3] / count_rejected)
        losses = ipo_losses(*args, beta=self.beta)
        return LossOutput(losses, pair_metrics(self.beta, policy, reference))


class MADPOLoss(PreferenceLoss):
    """MADPO: w(m)·(−log σ(β h)), the weight w from the reward model's margin m of the pair (the plain batch mean).

    Args:
        beta: DPO temperature β.
        c_max: Amplification intensity c_max (the paper's headline 4; the authors' notebook uses 2); 1 is plain DPO.
        c_min: Floor of c; null means 1/c_max.
        lam: Steepness λ.
        tau: Margin threshold τ on the reward model's logit scale (ln 999 ≈ 6.9068).
        variant: Weight variant: full, amp_only (c clamped ≥ 1), reg_only (c clamped ≤ 1); no_downweight (w clipped to
            ≥ 1), no_amplify (w clipped to ≤ 1).
        normalize_weights: Divide the weights by their global batch mean (not in the paper).
    """

    metric_names = PAIR_METRICS + ("madpo/weight_mean", "madpo/weight_min", "madpo/weight_max", "rm/margin_mean")

    def __init__(
        self,
        beta: float = 0.1,
        c_max: float = 4.0,
        c_min: float | None = None,
        lam: float = 1.0,
        tau: float = math.log(999.0),
        variant: Variant = "full",
        normalize_weights: bool = False,
    ) -> None:
        super().__init__()
        _check_positive(beta=beta)
        self.beta, self.c_max, self.c_min, self.lam, self.tau = beta, c_max, c_min, lam, tau
        self.variant, self.normalize_weights = variant, normalize_weights
        self.weights(torch.zeros(1))  # validate the weight options now, not at the first step

    def data_requirements(self) -> DataRequirements:
        from madpo.data.requirements import DataRequirements

        return DataRequirements(pairs=True, reference_logps=True, rm_margin=True)

    def weight_options(self) -> dict[str, Any]:
        return {"c_max": self.c_max, "c_min": self.c_min, "lam": self.lam, "tau": self.tau, "variant": self.variant}

    def weights(self, margins: Tensor) -> Tensor:
        """w(m) for reward-model margins (B,)."""
        return madpo_weights(margins, **self.weight_options())

    def forward(
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        if "rm_margin" not in batch:
            raise ValueError("MADPOLoss needs rm_margin in the batch: pass --data.reward_model or an rm_margin column")
        margins = batch["rm_margin"].float()
        losses, weights = madpo_losses_and_weights(
            *_pair_args(policy, reference), margins, beta=self.beta, **self.weight_options()
        )
        if self.normalize_weights:  # Σ w·ℓ / Σ w over the global batch instead of the paper's mean
            scale = ctx.gather(weights).mean().clamp_min(1e-12)
            losses, weights = losses / scale, weights / scale
        metrics = {
            "madpo/weight_mean": weights,
            "madpo/weight_min": weights,
            "madpo/weight_max": weights,
            "rm/margin_mean": margins,
        }
        return LossOutput(losses, {**metrics, **pair_metrics(self.beta, policy, reference)})

    def epoch_histograms(self, margins: Tensor) -> dict[str, Tensor]:
        return {"madpo/weight": self.weights(margins)}


class BetaDPOLoss(BetaDPO, PreferenceLoss):
    """β-DPO: a batch-level β and a Gaussian filter on the implicit margin; its EMAs are buffers (`gap_mean`,
    `gap_std`, `step`), so they are in the checkpoint. Under gradient accumulation the selection (EMA update,
    kept pairs, β_batch) is made once per optimiser step on all of its rows, as the method defines it.

    Args:
        beta: β0, the base temperature.
        alpha: α in β_batch = β0·(1 + α·(mean kept gap − μ)).
        rho: Fraction ρ of pairs filtered out per global batch.
        momentum: EMA momentum γ of the gap statistics.
    """

    metric_names = PAIR_METRICS + ("beta_dpo/kept",)
    gap_variant = "official"
    """`BetaDPO`'s variant; a subclass picks another, so the init arguments (and cached runs' keys) stay the same."""

    def __init__(self, beta: float = 0.1, alpha: float = 0.6, rho: float = 0.2, momentum: float = 0.9) -> None:
        super().__init__(beta=beta, alpha=alpha, rho=rho, momentum=momentum, variant=self.gap_variant)
        self.beta = beta

    def forward(  # type: ignore[override]
        self, policy: LogProbs, reference: tuple[Tensor, Tensor] | None, batch: dict[str, Tensor], ctx: LossContext
    ) -> LossOutput:
        assert reference is not None
        self.train(ctx.stage == "train")  # the EMA updates only on training steps
        args = _pair_args(policy, reference)
        loss = None
        if ctx.accumulate:
            loss, losses, mask, sel = self._accumulated(args, batch["index"], ctx)
            beta_t, gap_mean, gap_std = (
                x.to(losses.device, losses.dtype) for x in (sel.beta, sel.gap_mean, sel.gap_std)
            )
            clamped = torch.tensor(float(sel.clamped), device=losses.device, dtype=losses.dtype)
        else:
            out = BetaDPO.forward(self, *args, all_gather=ctx.gather, rank=ctx.rank, order_key=batch["index"])
            losses, mask, beta_t, gap_mean, gap_std = out.losses, out.mask, out.beta, out.gap_mean, out.gap_std
            clamped = out.clamped
        metrics = {"beta_dpo/kept": mask.float(), **pair_metrics(self.beta, policy, reference)}
        # beta_dpo/clamped: its epoch mean is the share of steps whose raw beta_batch was below the floor min_beta
        scalars = {"beta/effective": beta_t, "beta_dpo/gap_mean": gap_mean, "beta_dpo/gap_std": gap_std}
        scalars["beta_dpo/clamped"] = clamped
        return LossOutput(losses, metrics, scalars, loss=loss)

    def _step_selection(self, index: Tensor, ctx: LossContext) -> tuple[dict[int, bool], BetaDPOSelection]:
        """The EMA update, kept-pair mask and β_batch over the whole optimiser step (all micro-batches, all ranks):
        the policy's gaps on the step's rows, without gradient, once per step."""
        cached = getattr(self, "_cached_selection", (None, None, None))
        if cached[0] != ctx.step_key:
            assert ctx.step_logps is not None
            step_index, logps, (ref_chosen, ref_rejected) = ctx.step_logps()
            assert logps.rejected is not None
            gaps = implicit_margin(logps.chosen, logps.rejected, ref_chosen, ref_rejected)
            selection = self.select(gaps, all_gather=ctx.gather, rank=ctx.rank, order_key=step_index)
            kept = dict(zip(step_index.tolist(), selection.mask.tolist(), strict=True))
            cached = (ctx.step_key, kept, selection)
            self._cached_selection = cached
        _, kept, selection = cached
        if any(i not in kept for i in index.tolist()):
            raise RuntimeError("micro-batch rows are not in their optimiser step: the loader's order changed")
        return kept, selection

    def _accumulated(
        self, args: tuple[Tensor, ...], index: Tensor, ctx: LossContext
    ) -> tuple[Tensor, Tensor, Tensor, BetaDPOSelection]:
        """(loss to return, per-pair losses, mask, selection) for one micro-batch. Lightning divides each returned
        loss by `accumulate` and DDP averages over ranks, so the returned sum carries world * accumulate / N_kept:
        the optimiser then sees the mean of -log σ(β_batch h) over the step's kept pairs."""
        kept, selection = self._step_selection(index, ctx)
        h = implicit_margin(*args)
        mask = torch.tensor([kept[i] for i in index.tolist()], device=h.device)
        per_pair = -F.logsigmoid(selection.beta.to(h.device, h.dtype) * h)
        masked = torch.where(mask, per_pair, torch.zeros_like(per_pair))
        loss = masked.sum() * (ctx.world_size * ctx.accumulate / selection.n_kept)
        return loss, masked * (selection.n / selection.n_kept), mask, selection


class MADPORepoBetaDPOLoss(BetaDPOLoss):
    """β-DPO as the MADPO repository runs it, the variant behind the MADPO paper's β-DPO row: the gap is scaled by
    β0, the EMAs start at (0, 1), and β_batch = β0·(1 + α·(mean gap − μ)) over all pairs of the step, before the
    filter, without a floor (it can go negative; `beta_dpo/clamped` then counts the steps below β_min).

    Args:
        beta: β0, the base temperature.
        alpha: α in β_batch = β0·(1 + α·(mean gap − μ)).
        rho: Fraction ρ of pairs filtered out per global batch.
        momentum: EMA momentum γ of the gap statistics.
    """

    gap_variant = "madpo_repo"


__all__ = [
    "BetaDPOLoss",
    "MADPORepoBetaDPOLoss",
    "DPOLoss",
    "IPOLoss",
    "LogProbs",
    "LossContext",
    "LossOutput",
    "MADPOLoss",
    "PAIR_METRICS",
    "PreferenceLoss",
    "SFTLoss",
    "build_loss",
    "class_path",
    "loss_config",
    "pair_metrics",
    "with_options",
]
