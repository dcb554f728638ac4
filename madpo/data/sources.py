"""Where `PreferenceDataModule`'s rows come from: files, a hub dataset or in-memory datasets, validated
(`madpo.data.formats`) and split into train/val (or test), and the check that they can serve the module's
`DataRequirements` before anything is tokenized or scored."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import datasets

from madpo.data.formats import IN_MEMORY, SFT, InvalidRows, RawData, load_files, load_hub, load_in_memory
from madpo.data.requirements import DataRequirements
from madpo.errors import UserError


def load_splits(
    stage: str | None,
    *,
    train_source: datasets.Dataset | None = None,
    val_source: datasets.Dataset | None = None,
    train_files: str | list[str] | None = None,
    val_files: str | list[str] | None = None,
    test_files: str | list[str] | None = None,
    dataset_name: str | None = None,
    train_split: str = "train",
    val_split: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    invalid_rows: InvalidRows = "raise",
) -> dict[str, RawData]:
    """The validated rows of each split `stage` needs: `{"test": ...}` for "test", else "train" (unless a
    validate-only stage has only validation data) and "val" when a validation source or `val_fraction` gives one.

    Sources, first given wins: in-memory datasets, files, the hub dataset `dataset_name`. `val_fraction` holds out a
    seeded fraction of the training rows and cannot be combined with a validation source."""
    if stage == "test":
        if test_files is None:
            raise UserError("test needs test data: pass --data.test_files (local files, same formats as val_files)")
        return {"test": load_files(test_files, invalid_rows=invalid_rows)}
    has_val_source = (
        val_source is not None or val_files is not None or (dataset_name is not None and val_split is not None)
    )
    if train_source is not None:
        train: RawData | None = load_in_memory(train_source, invalid_rows=invalid_rows)
    elif train_files is not None:
        train = load_files(train_files, invalid_rows=invalid_rows)
    elif dataset_name is not None:
        train = load_hub(dataset_name, train_split, invalid_rows=invalid_rows)
    elif has_val_source and stage not in (None, "fit"):
        train = None
    else:
        raise ValueError(
            "no training data: pass --data.train_files (local files) or --data.dataset_name (a hub dataset), or "
            "use PreferenceDataModule.from_datasets(train, val)"
        )

    if val_source is not None:
        val: RawData | None = load_in_memory(val_source, invalid_rows=invalid_rows, source=f"{IN_MEMORY} (validation)")
    elif val_files is not None:
        val = load_files(val_files, invalid_rows=invalid_rows)
    elif dataset_name is not None and val_split is not None:
        val = load_hub(dataset_name, val_split, invalid_rows=invalid_rows)
    else:
        val = None
    if val_fraction > 0:
        if val is not None:
            raise ValueError("val_fraction splits the training data and cannot be combined with a validation source")
        assert train is not None
        train, val = split_validation(train, val_fraction, seed)

    raws = {name: raw for name, raw in (("train", train), ("val", val)) if raw is not None}
    if len({(r.format, r.conversational) for r in raws.values()}) > 1:
        raise ValueError(
            "training and validation data must share one format; got "
            + ", ".join(f"{s}: {r.format}{' (conversational)' if r.conversational else ''}" for s, r in raws.items())
        )
    return raws


def split_validation(raw: RawData, fraction: float, seed: int) -> tuple[RawData, RawData]:
    """Seeded train/validation split of validated rows (`index` keeps pointing at the source rows)."""
    if len(raw.dataset) < 2:
        raise ValueError(f"val_fraction={fraction} needs at least 2 training rows, got {len(raw.dataset)}")
    fp = hashlib.blake2b(f"{raw.dataset._fingerprint}-{fraction}-{seed}".encode(), digest_size=8).hexdigest()
    parts = raw.dataset.train_test_split(
        test_size=fraction, seed=seed, train_new_fingerprint=f"{fp}-train", test_new_fingerprint=f"{fp}-val"
    )
    sources = [f"{s} (val_fraction={fraction}, seed={seed})" for s in raw.sources]
    train = replace(raw, dataset=parts["train"], sources=list(raw.sources))
    val = replace(
        raw, dataset=parts["test"], rows_in=len(parts["test"]), dropped={}, sources=sources, implicit_prompts=0
    )
    return train, val


def check_requirements(req: DataRequirements, raws: dict[str, RawData], *, reward_model: str | None) -> None:
    """Refuse data that cannot serve `req`: SFT rows for a pairs module, and no `rm_margin` (column or
    `reward_model`) for a module that reads margins."""
    fmt = next(iter(raws.values())).format
    if fmt == SFT and (req.pairs or req.reference_logps or req.rm_margin):
        flags = (("pairs", req.pairs), ("reference_logps", req.reference_logps), ("rm_margin", req.rm_margin))
        needs = [name for name, wanted in flags if wanted]
        sources = sorted({s for r in raws.values() for s in r.sources})
        raise ValueError(
            f"the model needs preference pairs ({', '.join(needs)}): columns prompt/chosen/rejected, but the data "
            f"{sources} is in SFT format (prompt/completion)"
        )
    if fmt == SFT and reward_model is not None:
        raise ValueError("reward_model scores preference pairs; the data is in SFT format (prompt/completion)")
    if req.rm_margin and reward_model is None:
        lacking = [s for s, r in raws.items() if "rm_margin" not in r.dataset.column_names]
        if lacking:
            raise ValueError(
                f"the model needs an rm_margin per pair but the {' and '.join(lacking)} data has no 'rm_margin' "
                "column: pass --data.reward_model (a trained reward model to score the margins) or provide an "
                "'rm_margin' column in the data"
            )
