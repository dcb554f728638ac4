"""What a LightningModule needs from the data (the module <-> DataModule handshake of docs/contracts.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataRequirements:
    """Returned by `module.data_requirements()`; read by `PreferenceDataModule.setup`.

    Attributes:
        pairs: the module trains on preference pairs (prompt/chosen/rejected); SFT-format data is refused.
        reference_logps: the module needs `ref_chosen_logps`/`ref_rejected_logps` columns, scored once with
            `module.reference_model()`.
        rm_margin: the module needs an `rm_margin` column (from the data or from `--data.reward_model`).
    """

    pairs: bool = True
    reference_logps: bool = False
    rm_margin: bool = False
