"""Data layer: formats (load + validate rows), tokenize, collate, and the `PreferenceDataModule`."""

from madpo.data.collate import PreferenceCollator
from madpo.data.datamodule import PreferenceDataModule
from madpo.data.requirements import DataRequirements

__all__ = ["DataRequirements", "PreferenceCollator", "PreferenceDataModule"]
