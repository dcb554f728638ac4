"""Method presets: a name (`--policy.method odpo`, `compare_with: [dpo]`, a sweep's method list) for a loss class and
the options that define it. Every other option (β, MADPO's c_max, ...) stays the configured loss's own."""

from __future__ import annotations

import inspect
from typing import Any

from madpo.losses import (
    BetaDPOLoss,
    CDPOLoss,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    MADPOLoss,
    MADPORepoBetaDPOLoss,
    MarginTargetLoss,
    ODPOLoss,
    PreferenceLoss,
    RDPOLoss,
)

METHODS: dict[str, tuple[type[PreferenceLoss], dict[str, Any]]] = {
    "dpo": (DPOLoss, {}),
    "ipo": (IPOLoss, {}),
    "beta_dpo": (BetaDPOLoss, {}),
    # its ablation, alpha = 0: beta stays beta0 and only the data filter acts. Listed before the variant itself so
    # that `method_name` finds the narrower preset first.
    "beta_dpo_filter_only": (MADPORepoBetaDPOLoss, {"alpha": 0.0}),
    # the MADPO repository's beta-DPO, behind the MADPO paper's beta-DPO row (docs/method.md)
    "beta_dpo_madpo_repo": (MADPORepoBetaDPOLoss, {}),
    "madpo": (MADPOLoss, {"variant": "full"}),
    "madpo_amp_only": (MADPOLoss, {"variant": "amp_only"}),
    "madpo_reg_only": (MADPOLoss, {"variant": "reg_only"}),
    "madpo_no_downweight": (MADPOLoss, {"variant": "no_downweight"}),
    "madpo_no_amplify": (MADPOLoss, {"variant": "no_amplify"}),
    # the competitors that read the same margin another way, and the noise-robust ones that read none
    "odpo": (ODPOLoss, {"alpha": 1.0}),
    "margin_target": (MarginTargetLoss, {"eta": 1.0}),
    "cdpo": (CDPOLoss, {"label_smoothing": 0.1}),
    "rdpo": (RDPOLoss, {"label_smoothing": 0.1}),
    "hinge": (HingeLoss, {}),
}
"""Preset name -> (loss class, the options that define the preset). Every other option is the loss class's own."""


def preset_loss(method: str, like: PreferenceLoss | None = None) -> PreferenceLoss:
    """The preset `method`'s loss, with the options of `like` that its class also takes (β, MADPO's c_max, ...)."""
    cls, overrides = METHODS[method]
    params = inspect.signature(cls.__init__).parameters
    carried = {k: v for k, v in like.init_args().items() if k in params} if like is not None else {}
    return cls(**{**carried, **overrides})


def method_name(loss: PreferenceLoss) -> str:
    """The first preset `loss` is an instance of (its class, the preset's options), else the class name."""
    options = loss.init_args()
    for name, (cls, overrides) in METHODS.items():
        if type(loss) is cls and all(options.get(k) == v for k, v in overrides.items()):
            return name
    return type(loss).__name__
