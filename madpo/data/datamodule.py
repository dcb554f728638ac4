"""`PreferenceDataModule`: files / hub / in-memory rows -> validated -> tokenized -> (+ rm_margin, + reference
log-probs) -> batches of docs/contracts.md.

`setup()` does everything once (later calls for other stages return at once):

1. load the tokenizer (`tokenizer`) and the rows of each split, validating them (`madpo.data.formats`);
2. tokenize each split once (`madpo.data.tokenize`, cached by `datasets`), main process first under DDP;
3. the handshake: read `trainer.lightning_module.data_requirements()` (default: pairs only) and refuse data that
   cannot serve it; score `rm_margin` with `reward_model` and the reference log-probs with
   `module.reference_model()` (`madpo.scoring`, DDP-sharded, cached under `cache_dir`).

Every step's counts are kept in `self.stats` (the LightningModule logs them) and printed on rank 0 at the end of
setup (`madpo.data.report`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal

import datasets
import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from madpo.data.collate import PreferenceCollator, collate_prompts
from madpo.data.formats import IN_MEMORY, SFT, RawData, load_files, load_hub, load_in_memory
from madpo.data.loader import ResumableDataLoader, ResumableSampler
from madpo.data.report import format_split_report, print_data_report
from madpo.data.requirements import DataRequirements
from madpo.data.tokenize import tokenize_dataset, tokenize_prompts
from madpo.errors import UserError
from madpo.modeling import (
    check_reward_model_path,
    load_reward_model,
    load_tokenizer,
    state_fingerprint,
    tokenizer_fingerprint,
)
from madpo.scoring import (
    _barrier,
    _dist,
    cached_columns,
    data_fingerprint,
    score_margins,
    score_reference_logps,
)

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (it fills the `datasets` cache), then the other ranks (they read it)."""
    rank, world = _dist()
    if world > 1 and rank != 0:
        _barrier()
    try:
        yield
    finally:
        if world > 1 and rank == 0:
            _barrier()


class PreferenceDataModule(L.LightningDataModule):
    """Preference (prompt/chosen/rejected) or SFT (prompt/completion) data for the madpo LightningModules.

    Training data comes from `train_files`, from `dataset_name` (hub) or, in Python, from
    `PreferenceDataModule.from_datasets(train, val)`. Validation data comes from `val_files`, from `val_split` of
    `dataset_name`, or from a seeded `val_fraction` of the training rows.

    Args:
        train_files: local training file(s), `.json`/`.jsonl`/`.parquet`/`.csv` (globs allowed).
        val_files: local validation file(s), same formats.
        test_files: local test file(s) for `test` (same formats and validation as the validation files; scored with
            the reward model and reference as validation is); the metrics are validation's, named test/<name>.
        predict_files: local prompt file(s) for `predict`: a `prompt` column (string or chat messages); other
            columns, e.g. chosen/rejected, are ignored. Prompts are tokenized as training prompts are.
        dataset_name: a hub dataset id (or any path `datasets.load_dataset` accepts), used when no `train_files`.
        train_split: split of `dataset_name` to train on.
        val_split: split of `dataset_name` to validate on (None: no hub validation split).
        val_fraction: fraction of the training rows held out for validation (seeded by `seed`) when no validation
            source is given; 0 disables.
        tokenizer: hub id or local directory of the tokenizer (must match the policy's; required).
        max_length: maximum tokens of prompt + completion; completions are cut (end) to fit.
        max_prompt_length: maximum prompt tokens; longer prompts keep their end (and a leading BOS).
        batch_size: training batch size, in pairs (a batch holds 2 x batch_size sequences).
        eval_batch_size: validation batch size in pairs (None: `batch_size`).
        num_workers: DataLoader worker processes.
        pad_to_multiple_of: round padded batch lengths up to this multiple (e.g. 8); None: no rounding.
        group_by_length: draw training batches of similar lengths (less padding, faster steps): each epoch's seeded
            permutation is cut into mega-batches of 50 global batches, each sorted by length and cut into global
            batches, whose order is shuffled (the longest first, so an out-of-memory error shows at step 0). Still
            epoch-seeded, resumable and the same global batches for any number of processes; off by default (it
            changes which pairs share a batch).
        reward_model: directory or hub id of a trained reward model (`*ForSequenceClassification`, num_labels=1, with
            its tokenizer saved alongside); when given, `rm_margin` = r(chosen) - r(rejected) is scored once and
            cached.
        scoring_batch_size: batch size (in pairs) for scoring rm_margin and reference log-probs.
        cache_dir: directory of the scoring cache (rm_margin, reference log-probs), keyed by data, model, tokenizer
            and lengths.
        invalid_rows: what to do with a malformed row: "raise" (error naming file, row and field) or "drop" (drop,
            count and log it).
        margin_noise_std: robustness experiments: add Gaussian noise of this std to the training split's rm_margin
            (seeded by `seed`, applied once after scoring; the cache keeps the clean margins). 0 = off.
        margin_flip_fraction: robustness experiments: flip the sign of this fraction of training margins (seeded).
        seed: seed of the `val_fraction` split and of the training shuffle.
        trust_remote_code: allow custom code of hub tokenizers/models.
    """

    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        predict_files: str | list[str] | None = None,
        dataset_name: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.0,
        tokenizer: str | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = False,
        reward_model: str | None = None,
        scoring_batch_size: int = 32,
        cache_dir: str = ".cache/madpo",
        invalid_rows: Literal["raise", "drop"] = "raise",
        margin_noise_std: float = 0.0,
        margin_flip_fraction: float = 0.0,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}), leaving room for the "
                "completion"
            )
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1) or scoring_batch_size < 1:
            raise ValueError("batch_size, eval_batch_size and scoring_batch_size must be >= 1")
        if margin_noise_std < 0 or not 0.0 <= margin_flip_fraction <= 1.0:
            raise ValueError(
                f"margin_noise_std must be >= 0 and margin_flip_fraction in [0, 1]; got {margin_noise_std}, "
                f"{margin_flip_fraction}"
            )
        if invalid_rows not in ("raise", "drop"):
            raise ValueError(f"invalid_rows must be 'raise' or 'drop', got {invalid_rows!r}")
        self._train_source: datasets.Dataset | None = None
        self._val_source: datasets.Dataset | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.test_dataset: datasets.Dataset | None = None
        self.predict_dataset: datasets.Dataset | None = None
        self.format: str | None = None
        self.requirements: DataRequirements | None = None
        self.stats: dict[str, Any] = {}
        self._is_setup = False
        self._train_sampler: ResumableSampler | None = None

    @classmethod
    def from_datasets(
        cls, train: datasets.Dataset | None, val: datasets.Dataset | None = None, **kwargs: Any
    ) -> PreferenceDataModule:
        """A datamodule over in-memory `datasets.Dataset`s (library use); `kwargs` are the other `__init__` args."""
        for name in ("train_files", "val_files", "dataset_name"):
            if kwargs.get(name) is not None:
                raise ValueError(f"from_datasets takes the data as datasets; do not also pass {name}")
        dm = cls(**kwargs)
        dm._train_source, dm._val_source = train, val
        return dm

    # --------------------------------------------------------------------------------------------------------------
    # Tokenizer and collator
    # --------------------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The data tokenizer (loaded on first use from the `tokenizer` argument)."""
        if self._tokenizer is None:
            if self.hparams.tokenizer is None:
                raise ValueError(
                    "PreferenceDataModule needs a tokenizer: pass --data.tokenizer (a hub id or local directory, the "
                    "policy's tokenizer)"
                )
            self._tokenizer = load_tokenizer(self.hparams.tokenizer, trust_remote_code=self.hparams.trust_remote_code)
        return self._tokenizer

    @property
    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id, self.hparams.pad_to_multiple_of)

    # --------------------------------------------------------------------------------------------------------------
    # setup
    # --------------------------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        if self.test_dataset is not None if stage == "test" else self._is_setup:
            return
        tokenizer = self.tokenizer
        module = self.trainer.lightning_module if self.trainer is not None else None
        req = module.data_requirements() if module is not None and hasattr(module, "data_requirements") else None
        # without a module nothing is required: the data is served as it is
        self.requirements = req = req if req is not None else DataRequirements(pairs=False)
        with main_process_first():
            raws = self._load_raw(stage)
            self.format = next(iter(raws.values())).format
            self._check_requirements(req, raws)  # before any tokenization or scoring
            tokenized = {}
            for split, raw in raws.items():
                tokenized[split], tok_stats = tokenize_dataset(
                    raw,
                    tokenizer,
                    max_length=self.hparams.max_length,
                    max_prompt_length=self.hparams.max_prompt_length,
                    split=split,
                )
                self.stats[split] = {
                    "sources": raw.sources,
                    "format": raw.format + (" (conversational)" if raw.conversational else ""),
                    "rows_loaded": raw.rows_in,
                    "rows_dropped": dict(raw.dropped),
                    "implicit_prompts": raw.implicit_prompts,
                    "tokenize": tok_stats.as_dict(),
                }
        if "train" in tokenized and len(tokenized["train"]) == 0:
            hp = self.hparams
            counts = format_split_report(
                "train", self.stats["train"], max_length=hp.max_length, max_prompt_length=hp.max_prompt_length
            )
            raise UserError(f"no training rows left after validation and tokenization: {counts.split(' ', 1)[1]}")
        if "val" in tokenized and len(tokenized["val"]) == 0:
            log.warning("no validation rows left after validation and tokenization; validation is skipped")
            del tokenized["val"]
        if "test" in tokenized and len(tokenized["test"]) == 0:
            hp = self.hparams
            counts = format_split_report(
                "test", self.stats["test"], max_length=hp.max_length, max_prompt_length=hp.max_prompt_length
            )
            raise UserError(f"no test rows left after validation and tokenization: {counts.split(' ', 1)[1]}")
        if self.hparams.reward_model is not None:
            self._add_rm_margins(tokenized)
        if "train" in tokenized and (self.hparams.margin_noise_std or self.hparams.margin_flip_fraction):
            tokenized["train"] = self._perturb_margins(tokenized["train"])
        if req.reference_logps:
            self._add_reference_logps(module, tokenized)
        if stage == "test":
            self.test_dataset = tokenized["test"]
        else:
            self.train_dataset = tokenized.get("train")
            self.val_dataset = tokenized.get("val")
        for split, ds in tokenized.items():
            self.stats[split]["rows"] = len(ds)
            self.stats[split]["columns"] = ds.column_names
        log.info("PreferenceDataModule stats: %s", json.dumps(self.stats, default=str))
        if _dist()[0] == 0:  # rows dropped and text cut change what the model sees: say so, not only at INFO
            hp = self.hparams
            print_data_report(
                {k: v for k, v in self.stats.items() if k in raws},  # this call's splits
                max_length=hp.max_length,
                max_prompt_length=hp.max_prompt_length,
            )
        if stage != "test":
            self._is_setup = True

    def _load_raw(self, stage: str | None) -> dict[str, RawData]:
        hp = self.hparams
        policy = hp.invalid_rows
        if stage == "test":
            if hp.test_files is None:
                raise UserError("test needs test data: pass --data.test_files (local files, same formats as val_files)")
            return {"test": load_files(hp.test_files, invalid_rows=policy)}
        has_val_source = (
            self._val_source is not None
            or hp.val_files is not None
            or (hp.dataset_name is not None and hp.val_split is not None)
        )
        if self._train_source is not None:
            train: RawData | None = load_in_memory(self._train_source, invalid_rows=policy)
        elif hp.train_files is not None:
            train = load_files(hp.train_files, invalid_rows=policy)
        elif hp.dataset_name is not None:
            train = load_hub(hp.dataset_name, hp.train_split, invalid_rows=policy)
        elif has_val_source and stage not in (None, "fit"):
            train = None
        else:
            raise ValueError(
                "no training data: pass --data.train_files (local files) or --data.dataset_name (a hub dataset), or "
                "use PreferenceDataModule.from_datasets(train, val)"
            )

        if self._val_source is not None:
            val: RawData | None = load_in_memory(
                self._val_source, invalid_rows=policy, source=f"{IN_MEMORY} (validation)"
            )
        elif hp.val_files is not None:
            val = load_files(hp.val_files, invalid_rows=policy)
        elif hp.dataset_name is not None and hp.val_split is not None:
            val = load_hub(hp.dataset_name, hp.val_split, invalid_rows=policy)
        else:
            val = None
        if hp.val_fraction > 0:
            if val is not None:
                raise ValueError(
                    "val_fraction splits the training data and cannot be combined with a validation source"
                )
            assert train is not None
            train, val = self._split(train, hp.val_fraction, hp.seed)

        raws = {name: raw for name, raw in (("train", train), ("val", val)) if raw is not None}
        kinds = {(r.format, r.conversational) for r in raws.values()}
        if len(kinds) > 1:
            raise ValueError(
                "training and validation data must share one format; got "
                + ", ".join(
                    f"{s}: {r.format}{' (conversational)' if r.conversational else ''}" for s, r in raws.items()
                )
            )
        return raws

    @staticmethod
    def _split(raw: RawData, fraction: float, seed: int) -> tuple[RawData, RawData]:
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

    def _check_requirements(self, req: DataRequirements, raws: dict[str, RawData]) -> None:
        if self.format == SFT and (req.pairs or req.reference_logps or req.rm_margin):
            needs = [
                n
                for n, v in (
                    ("pairs", req.pairs),
                    ("reference_logps", req.reference_logps),
                    ("rm_margin", req.rm_margin),
                )
                if v
            ]
            sources = sorted({s for r in raws.values() for s in r.sources})
            raise ValueError(
                f"the model needs preference pairs ({', '.join(needs)}): columns prompt/chosen/rejected, but the data "
                f"{sources} is in SFT format (prompt/completion)"
            )
        if self.format == SFT and self.hparams.reward_model is not None:
            raise ValueError("reward_model scores preference pairs; the data is in SFT format (prompt/completion)")
        if req.rm_margin and self.hparams.reward_model is None:
            lacking = [s for s, r in raws.items() if "rm_margin" not in r.dataset.column_names]
            if lacking:
                raise ValueError(
                    f"the model needs an rm_margin per pair but the {' and '.join(lacking)} data has no 'rm_margin' "
                    "column: pass --data.reward_model (a trained reward model to score the margins) or provide an "
                    "'rm_margin' column in the data"
                )

    # --------------------------------------------------------------------------------------------------------------
    # Scoring (rm_margin, reference log-probs)
    # --------------------------------------------------------------------------------------------------------------

    def _scoring_context(self) -> tuple[torch.device, Any, str]:
        """(device, forward_context, precision) for scoring: the trainer's when one is attached, else CPU fp32."""
        if self.trainer is None:
            return torch.device("cpu"), None, "32-true"
        plugin = self.trainer.precision_plugin
        return self.trainer.strategy.root_device, plugin.forward_context, str(getattr(plugin, "precision", None))

    def _key_parts(
        self, dataset: datasets.Dataset, model: torch.nn.Module, precision: str, model_key: str | None = None
    ) -> dict[str, Any]:
        return {
            "data": data_fingerprint(dataset),
            "model": model_key or state_fingerprint(model),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "max_length": self.hparams.max_length,
            "max_prompt_length": self.hparams.max_prompt_length,
            "precision": precision,
        }

    def _perturb_margins(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """m' = s * (m + noise), noise ~ N(0, std^2), s = -1 on a seeded random fraction of pairs, else +1."""
        if "rm_margin" not in dataset.column_names:
            raise ValueError("margin_noise_std / margin_flip_fraction need rm_margin: pass --data.reward_model")
        margins = torch.tensor(dataset["rm_margin"], dtype=torch.float64)
        generator = torch.Generator().manual_seed(self.hparams.seed + 7919)
        noise = torch.randn(len(margins), generator=generator, dtype=torch.float64) * self.hparams.margin_noise_std
        n_flip = round(self.hparams.margin_flip_fraction * len(margins))
        flip = torch.zeros(len(margins), dtype=torch.bool)
        flip[torch.randperm(len(margins), generator=generator)[:n_flip]] = True
        perturbed = torch.where(flip, -(margins + noise), margins + noise)
        self.stats["train"]["margin_perturbation"] = {
            "noise_std": self.hparams.margin_noise_std,
            "flipped": n_flip,
            "mean_abs_change": float((perturbed - margins).abs().mean()) if len(margins) else 0.0,
        }
        log.warning(
            "rm_margin of the training split perturbed for a robustness run: %s",
            self.stats["train"]["margin_perturbation"],
        )
        return self._set_column(dataset, "rm_margin", perturbed)

    @staticmethod
    def _set_column(dataset: datasets.Dataset, name: str, values: torch.Tensor) -> datasets.Dataset:
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        return dataset.add_column(name, values.double().tolist())

    def _add_rm_margins(self, tokenized: dict[str, datasets.Dataset]) -> None:
        path = self.hparams.reward_model
        check_reward_model_path(path)
        rm_tokenizer = load_tokenizer(path, trust_remote_code=self.hparams.trust_remote_code)
        if tokenizer_fingerprint(rm_tokenizer) != tokenizer_fingerprint(self.tokenizer):
            raise ValueError(
                f"the reward model's tokenizer ({path}) differs from the data tokenizer ({self.hparams.tokenizer}): "
                "margins would be scored on token ids it was not trained on; train the reward model with the "
                "policy's tokenizer"
            )
        device, forward_context, precision = self._scoring_context()
        model = load_reward_model(path, trust_remote_code=self.hparams.trust_remote_code).to(device).eval()
        model.requires_grad_(False)
        try:
            self._score_rm_margins(model, tokenized, device, forward_context, precision)
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _score_rm_margins(
        self,
        model: torch.nn.Module,
        tokenized: dict[str, datasets.Dataset],
        device: torch.device,
        forward_context: Any,
        precision: str,
    ) -> None:
        path = self.hparams.reward_model
        for split, ds in tokenized.items():
            if "rm_margin" in ds.column_names:
                log.warning(
                    "%s data already has an rm_margin column; reward_model=%s's margins replace it", split, path
                )

            def compute(ds: datasets.Dataset = ds, resume_dir: Any = None) -> dict[str, torch.Tensor]:
                margins = score_margins(
                    model,
                    ds,
                    self.collator,
                    batch_size=self.hparams.scoring_batch_size,
                    device=device,
                    forward_context=forward_context,
                    resume_dir=resume_dir,
                )
                return {"rm_margin": margins}

            columns, hit = cached_columns(
                self.hparams.cache_dir,
                "rm_margin",
                self._key_parts(ds, model, precision),
                compute,
                num_rows=len(ds),
                resumable=True,
            )
            tokenized[split] = self._set_column(ds, "rm_margin", columns["rm_margin"])
            self.stats[split]["rm_margin"] = {
                "source": f"reward_model={path}",
                "cache": "hit" if hit else "miss",
                "mean": float(columns["rm_margin"].mean()) if len(ds) else float("nan"),
            }

    def _add_reference_logps(self, module: Any, tokenized: dict[str, datasets.Dataset]) -> None:
        if not hasattr(module, "reference_model"):
            raise ValueError(
                f"{type(module).__name__}.data_requirements() asks for reference log-probs but the module has no "
                "reference_model() context manager"
            )
        device, forward_context, precision = self._scoring_context()
        with module.reference_model() as ref:
            fingerprint = getattr(module, "reference_fingerprint", state_fingerprint)
            ref_key = fingerprint(ref)  # once per fit, not per split
            for split, ds in tokenized.items():

                def compute(ds: datasets.Dataset = ds, resume_dir: Any = None) -> dict[str, torch.Tensor]:
                    chosen, rejected = score_reference_logps(
                        ref,
                        ds,
                        self.collator,
                        batch_size=self.hparams.scoring_batch_size,
                        device=device,
                        forward_context=forward_context,
                        resume_dir=resume_dir,
                    )
                    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

                columns, hit = cached_columns(
                    self.hparams.cache_dir,
                    "ref_logps",
                    self._key_parts(ds, ref, precision, ref_key),
                    compute,
                    num_rows=len(ds),
                    resumable=True,
                )
                for name in ("ref_chosen_logps", "ref_rejected_logps"):
                    ds = self._set_column(ds, name, columns[name])
                tokenized[split] = ds
                self.stats[split]["reference_logps"] = {"cache": "hit" if hit else "miss"}

    # --------------------------------------------------------------------------------------------------------------
    # DataLoaders
    # --------------------------------------------------------------------------------------------------------------

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0))

    def _batches_trained(self) -> int:
        """Batches of the current epoch the Trainer has trained (its own progress counter; 0 without a Trainer)."""
        trainer = self.trainer
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        return int(loop.batch_progress.current.processed) if loop is not None else 0

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("no training data: call setup('fit') first (the Trainer does) with a training source")
        # One epoch-seeded permutation (seed + epoch; Lightning calls set_epoch) for any number of processes: a
        # resumed run sees the same order as an uninterrupted one, and N ranks together see exactly the batches a
        # single process sees with an N-times larger batch. Lightning keeps a DistributedSampler it is given.
        world, rank = self._replicas()
        if self.hparams.get("group_by_length", False):
            sampler: ResumableSampler = LengthGroupedSampler(
                self.train_dataset,
                lengths=row_lengths(self.train_dataset),
                global_batch_size=self.hparams.batch_size * world,
                num_replicas=world,
                rank=rank,
                seed=self.hparams.seed,
            )
        else:
            sampler = ResumableSampler(
                self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.hparams.seed, drop_last=False
            )
        self._train_sampler = sampler
        return ResumableDataLoader(
            self.train_dataset,
            batches_trained=self._batches_trained,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def optimizer_step_batch(self, batch_idx: int, accumulate: int, n_batches: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the whole optimiser step that training micro-batch `batch_idx` (of the current epoch,
        `n_batches` in it) belongs to, collated as one batch: for losses whose normalisation or statistics span the
        optimiser step under gradient accumulation. Micro-batch j holds the epoch order's rows [jB, (j+1)B)."""
        sampler = self._train_sampler
        if sampler is None or self.train_dataset is None:
            raise RuntimeError("optimizer_step_batch needs train_dataloader() to have been built")
        size = self.hparams.batch_size
        first = batch_idx // accumulate * accumulate
        last = min(first + accumulate, n_batches)
        rows = sampler.epoch_order()[first * size : last * size]
        return self.collator([self.train_dataset[i] for i in rows])

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        world, rank = self._replicas()
        return DataLoader(
            self.val_dataset,
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            sampler=DistributedSampler(self.val_dataset, num_replicas=world, rank=rank, shuffle=False),
            collate_fn=self.collator,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise RuntimeError("no test data: call setup('test') first (the Trainer does) with test_files")
        world, rank = self._replicas()
        # padded like validation (a few rows repeat under DDP), so every rank runs the same number of steps
        return DataLoader(
            self.test_dataset,
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            sampler=DistributedSampler(self.test_dataset, num_replicas=world, rank=rank, shuffle=False),
            collate_fn=self.collator,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    # --------------------------------------------------------------------------------------------------------------
    # Prediction prompts
    # --------------------------------------------------------------------------------------------------------------

    def _setup_predict(self) -> None:
        """Load, validate and tokenize the prompts of `predict_files` (no scoring: predict samples the completions)."""
        if self.predict_dataset is not None:
            return
        hp = self.hparams
        if hp.predict_files is None:
            raise UserError("predict needs prompts: pass --data.predict_files (files with a 'prompt' column)")
        with main_process_first():
            raw = load_files(hp.predict_files, invalid_rows=hp.invalid_rows, prompts_only=True)
            dataset, tok_stats = tokenize_prompts(raw, self.tokenizer, max_prompt_length=hp.max_prompt_length)
        self.stats["predict"] = {
            "sources": raw.sources,
            "format": raw.format + (" (conversational)" if raw.conversational else ""),
            "rows_loaded": raw.rows_in,
            "rows_dropped": dict(raw.dropped),
            "tokenize": tok_stats.as_dict(),
            "rows": len(dataset),
        }
        if len(dataset) == 0:
            raise UserError(f"no prompts left after validation and tokenization: {self.stats['predict']}")
        if _dist()[0] == 0:
            print_data_report(
                {"predict": self.stats["predict"]}, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length
            )
        self.predict_dataset = dataset

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            raise RuntimeError("no prompts: call setup('predict') first (the Trainer does) with predict_files")
        world, rank = self._replicas()
        # each rank takes every world-th prompt, none twice; the prediction writer puts them back in order
        return DataLoader(
            self.predict_dataset,
            batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            sampler=UnrepeatedDistributedSampler(self.predict_dataset, num_replicas=world, rank=rank, shuffle=False),
            collate_fn=collate_prompts,
            num_workers=self.hparams.num_workers,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Length-grouped training order
# ----------------------------------------------------------------------------------------------------------------------


def row_lengths(dataset: datasets.Dataset) -> list[int]:
    """Padded width each row needs in a batch: prompt + the longer completion (prompt + completion for SFT rows)."""
    import pyarrow.compute as pc

    table = dataset.with_format(None).data
    width = pc.list_value_length(table.column("prompt_ids"))
    completions = [c for c in ("chosen_ids", "rejected_ids") if c in dataset.column_names]
    longest = pc.list_value_length(table.column(completions[0]))
    for name in completions[1:]:
        longest = pc.max_element_wise(longest, pc.list_value_length(table.column(name)))
    return pc.add(width, longest).to_pylist()


def length_grouped_order(lengths: list[int], global_batch_size: int, seed: int, *, megabatch: int = 50) -> list[int]:
    """A seeded permutation of `range(len(lengths))` whose consecutive chunks of `global_batch_size` hold rows of
    similar lengths (HF's LengthGroupedSampler scheme, with the batch order shuffled).

    The seeded permutation is cut into mega-batches of `megabatch` global batches; each is sorted by length (longest
    first) and cut into global batches; the full batches are shuffled (same generator) with the one holding the
    longest row first, and a final partial batch stays last so every other batch stays whole.
    """
    n = len(lengths)
    generator = torch.Generator()
    generator.manual_seed(seed)
    perm = torch.randperm(n, generator=generator).tolist()
    mega = global_batch_size * megabatch
    batches: list[list[int]] = []
    for start in range(0, n, mega):
        chunk = sorted(perm[start : start + mega], key=lambda i: -lengths[i])  # stable: ties keep the seeded order
        batches += [chunk[i : i + global_batch_size] for i in range(0, len(chunk), global_batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < global_batch_size else []
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        first = batches.pop(longest)
        batches = [first] + [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in batches + tail for i in batch]


class _LengthGroupedOrder(DistributedSampler):
    """`DistributedSampler` whose epoch permutation is `length_grouped_order(..., seed + epoch)`; padding and the
    per-rank split (`indices[rank::world]`) are DistributedSampler's, so rank r's k-th batch is every world-th row of
    the k-th global batch and N ranks together see exactly the batches one process sees with an N-times batch."""

    def __init__(self, dataset: Any, *, lengths: list[int], global_batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, shuffle=True, drop_last=False, **kwargs)
        if len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(dataset)} rows")
        if global_batch_size % self.num_replicas:
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of {self.num_replicas} ranks")
        self.lengths, self.global_batch_size = list(lengths), global_batch_size

    def __iter__(self) -> Iterator[int]:
        indices = length_grouped_order(self.lengths, self.global_batch_size, self.seed + self.epoch)
        padding = self.total_size - len(indices)
        if padding > 0:  # as DistributedSampler pads (drop_last=False)
            indices += (indices * -(-padding // len(indices)))[:padding]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class LengthGroupedSampler(ResumableSampler, _LengthGroupedOrder):
    """The resumable training sampler of `group_by_length=True` (resume logic from `ResumableSampler`)."""
