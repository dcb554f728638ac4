"""madpo: Margin-Adaptive DPO (MADPO) and DPO / IPO / β-DPO / SFT baselines on PyTorch Lightning.

The top-level names load lazily, so `import madpo.losses` stays a torch-only import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PreferenceDataModule": "madpo.data",
    "PolicyLightningModule": "madpo.modules",
    "RewardLightningModule": "madpo.modules",
    "LoraOptions": "madpo.modules",
    "OptimizerOptions": "madpo.modules",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'madpo' has no attribute {name!r}")
