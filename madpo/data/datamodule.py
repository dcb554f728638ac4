"""`PreferenceDataModule`: files / hub / in-memory rows -> validated -> tokenized -> (+ rm_margin, + reference
log-probs) -> batches of docs/contracts.md.

`setup()` does everything once (later calls for other stages return at once):

1. load the tokenizer (`tokenizer`) and the rows of each split, validating them (`madpo.data.formats`);
2. tokenize each split once (`madpo.data.tokenize`, cached by `datasets`), main process first under DDP;
3. the handshake: read `trainer.lightning_module.data_requirements()` (default: pairs only) and refuse data that
   cannot serve it; score `rm_margin` with `reward_model` and the reference log-probs with
   `module.reference_model()` (`madpo.scoring.attach_rm_margins` / `attach_reference_logps`: DDP-sharded, cached
   under `cache_dir`).

`rm_margin` (the reward model's r(chosen) - r(rejected), from the data or from `reward_model`) keeps that one name
from here to the loss, and is logged as `rm/margin_mean`; TRL's metric `rewards/margins` is another quantity, the
policy's implicit reward margin beta * h. Loading and splitting the sources lives in `madpo.data.sources`, the
length-grouped sampler in `madpo.data.samplers`.

Every step's counts are kept in `self.stats` (the LightningModule logs them) and printed on rank 0 at the end of
setup (`madpo.data.report`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import datasets
import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from madpo.data.collate import PreferenceCollator, collate_prompts
from madpo.data.formats import RawData, load_files
from madpo.data.loader import ResumableDataLoader, ResumableSampler
from madpo.data.report import format_split_report, print_data_report
from madpo.data.requirements import DataRequirements
from madpo.data.rm_text import attach_rm_margins_from_text, rm_lengths, tokenizers_differ
from madpo.data.samplers import LengthGroupedSampler, length_grouped_order, row_lengths
from madpo.data.sources import check_requirements, load_splits
from madpo.data.tokenize import tokenize_dataset, tokenize_prompts
from madpo.distributed import get_rank, main_process_first
from madpo.errors import UserError
from madpo.modeling import check_reward_model_path, load_tokenizer, state_fingerprint
from madpo.scoring import attach_reference_logps, attach_rm_margins, open_reward_model, scoring_context

__all__ = [  # the samplers and main_process_first are imported from here too
    "LengthGroupedSampler",
    "PreferenceDataModule",
    "length_grouped_order",
    "main_process_first",
    "row_lengths",
]

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
SOURCE_ARGS = (  # the hyperparameters `load_splits` reads
    "train_files",
    "val_files",
    "test_files",
    "dataset_name",
    "train_split",
    "val_split",
    "val_fraction",
    "seed",
    "invalid_rows",
)


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
            cached, replacing an `rm_margin` column of the data. A reward model with another tokenizer than
            `tokenizer` (its own backbone) scores the rows' text tokenized with its own tokenizer
            (`madpo.data.rm_text`). Without it, a module that reads margins needs an `rm_margin` column in the data
            (e.g. margins scored, or perturbed, beforehand).
        reward_model_max_length: with a reward model whose tokenizer differs from `tokenizer`: the tokens of
            prompt + completion under its tokenizer (the prompt keeps its end, leaving at least one completion
            token); None: `max_length`.
        scoring_batch_size: batch size (in pairs) for scoring rm_margin and reference log-probs.
        cache_dir: directory of the scoring cache (rm_margin, reference log-probs), keyed by data, model, tokenizer,
            lengths and precision.
        invalid_rows: what to do with a malformed row: "raise" (error naming file, row and field) or "drop" (drop,
            count and log it).
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
        reward_model_max_length: int | None = None,
        scoring_batch_size: int = 32,
        cache_dir: str = ".cache/madpo",
        invalid_rows: Literal["raise", "drop"] = "raise",
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
            hp = self.hparams
            raws = load_splits(
                stage,
                train_source=self._train_source,
                val_source=self._val_source,
                **{k: hp[k] for k in SOURCE_ARGS},
            )
            self.format = next(iter(raws.values())).format
            check_requirements(req, raws, reward_model=hp.reward_model)  # before any tokenization or scoring
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
            self._add_rm_margins(tokenized, raws)
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
        if get_rank() == 0:  # rows dropped and text cut change what the model sees: say so, not only at INFO
            hp = self.hparams
            print_data_report(
                {k: v for k, v in self.stats.items() if k in raws},  # this call's splits
                max_length=hp.max_length,
                max_prompt_length=hp.max_prompt_length,
            )
        if stage != "test":
            self._is_setup = True

    # --------------------------------------------------------------------------------------------------------------
    # Scoring (rm_margin, reference log-probs)
    # --------------------------------------------------------------------------------------------------------------

    def _scoring_args(self) -> dict[str, Any]:
        """What `attach_rm_margins` / `attach_reference_logps` share: the trainer's device and precision (CPU fp32
        without one), the collator, and the cache-key parts of this DataModule."""
        device, forward_context, precision = scoring_context(self.trainer)
        hp = self.hparams
        return {
            "collator": self.collator,
            "cache_dir": hp.cache_dir,
            "tokenizer": self.tokenizer,
            "max_length": hp.max_length,
            "max_prompt_length": hp.max_prompt_length,
            "precision": precision,
            "batch_size": hp.scoring_batch_size,
            "device": device,
            "forward_context": forward_context,
        }

    def _add_rm_margins(self, tokenized: dict[str, datasets.Dataset], raws: dict[str, RawData]) -> None:
        hp = self.hparams
        path = hp.reward_model
        args = self._scoring_args()
        check_reward_model_path(path)
        rm_tokenizer = load_tokenizer(path, trust_remote_code=hp.trust_remote_code)
        own = tokenizers_differ(rm_tokenizer, self.tokenizer)  # then scored from the text, with its tokenizer
        with open_reward_model(
            path, None if own else self.tokenizer, device=args["device"], trust_remote_code=hp.trust_remote_code
        ) as reward_model:
            model_fingerprint = state_fingerprint(reward_model)  # once, not per split
            for split, ds in tokenized.items():
                if "rm_margin" in ds.column_names:
                    log.warning(
                        "%s data already has an rm_margin column; reward_model=%s's margins replace it", split, path
                    )
                stats = self.stats[split]["rm_margin"] = {"source": f"reward_model={path}"}
                if not own:
                    tokenized[split] = attach_rm_margins(
                        ds, reward_model, model_fingerprint=model_fingerprint, stats=stats, **args
                    )
                    continue
                max_prompt_length, max_length = rm_lengths(hp.reward_model_max_length or hp.max_length)
                shared = {k: args[k] for k in ("cache_dir", "precision", "batch_size", "device", "forward_context")}
                tokenized[split] = attach_rm_margins_from_text(
                    ds,
                    raws[split],
                    reward_model,
                    rm_tokenizer,
                    max_length=max_length,
                    max_prompt_length=max_prompt_length,
                    model_fingerprint=model_fingerprint,
                    stats=stats,
                    split=split,
                    **shared,
                )

    def _add_reference_logps(self, module: Any, tokenized: dict[str, datasets.Dataset]) -> None:
        if not hasattr(module, "reference_model"):
            raise ValueError(
                f"{type(module).__name__}.data_requirements() asks for reference log-probs but the module has no "
                "reference_model() context manager"
            )
        args = self._scoring_args()
        with module.reference_model() as ref:
            # the module's own fingerprint may leave out tensors that do not change the reference's outputs
            model_fingerprint = getattr(module, "reference_fingerprint", state_fingerprint)(ref)
            for split, ds in tokenized.items():
                stats = self.stats[split]["reference_logps"] = {}
                tokenized[split] = attach_reference_logps(
                    ds, ref, model_fingerprint=model_fingerprint, stats=stats, **args
                )

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
        if get_rank() == 0:
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
