"""The offline IMDB pipeline's stages: each a function from explicit inputs to an output directory, cached.

A stage writes into `output_dir/<label>-<hash>`, where the hash (blake2b) covers the stage's own configuration and the
hashes of the stages it reads, so a change anywhere upstream re-runs everything below it and nothing else. The
manifest `stage.json` (configuration, upstream hashes, outputs, statistics, wall time) is written LAST, through a temp
file and a rename: a directory with a manifest is finished and is skipped ("[madpo] stage X: cached"); a directory
without one was interrupted and is wiped and redone.

Stages, in order (the arrows are their inputs):

1. `reviews`: the 25,000 IMDB reviews + the slices (prompts, SFT, oracle train/held-out).
2. `tokenizer` <- reviews: a byte-level BPE trained on the reviews, or the pretrained model's tokenizer.
3. `oracle` <- reviews, tokenizer: the sentiment oracle (TF-IDF trained here), its held-out accuracy on full
   reviews and on review snippets as long as the texts it will score.
4. `base_model` <- reviews, tokenizer: a small Llama trained as a language model on the reviews
   (`PolicyLightningModule(loss="sft")` on prompt="" / completion=review), or the pretrained model as given.
5. `sft` <- reviews, base_model: SFT on positive reviews (completion-only NLL after the first prompt tokens).
6. `pairs` <- reviews, oracle, sft: 2 samples per negative-review prompt, oracle scores, the three tiers, Gumbel
   labels, train/eval split: `pairs/<tier>/{train,eval}.jsonl` (TRL format + oracle columns) and a report.
7. `reward` <- base_model, pairs (per tier): a Bradley–Terry reward model.
8. `policy` <- sft, pairs, reward (MADPO methods): the preference-optimised policy.
9. `evaluate` <- the model (policy or SFT), sft (reference), oracle, pairs: oracle reward on held-out prompts,
   KL(policy‖SFT), examples; results.json/.md and TensorBoard.

Every training stage runs `lightning.Trainer` with the library's LightningModules and `PreferenceDataModule`; any
exception inside a stage is re-raised as `StageError("stage <name>: ...")`, keeping the row the cause names.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from madpo.io import atomic_write_json, atomic_write_jsonl
from madpo.losses import DEFAULT_TAU, class_path
from madpo.pipeline.config import (
    TIER_NAMES,
    BaseModelConfig,
    DataConfig,
    EvaluateConfig,
    OracleConfig,
    PairsConfig,
    PipelineConfig,
    PolicyConfig,
    RewardConfig,
    SftConfig,
    TrainerConfig,
)

log = logging.getLogger(__name__)

PIPELINE_VERSION = 2
"""Part of every stage hash: bump it when a stage's behaviour changes, so old caches are not reused."""
MANIFEST = "stage.json"


# ------------------------------------------------------------------------------------------------------------------
# Stage bookkeeping: hashing, manifests, caching, error wrapping
# ------------------------------------------------------------------------------------------------------------------


class StageError(RuntimeError):
    """A stage failed; the message starts with 'stage <name>:' and keeps the cause's message (row, field...)."""


@dataclass
class StageResult:
    """A finished stage: its directory, hash and manifest."""

    name: str
    """Stage kind (reviews, tokenizer, ..., evaluate)."""
    label: str
    """Directory prefix, e.g. 'reward-high' or 'policy-madpo-high-s0'."""
    path: Path
    """The stage directory."""
    key: str
    """The stage hash."""
    manifest: dict
    """The contents of stage.json."""
    cached: bool
    """True when this run found the stage finished and skipped it."""

    def output(self, name: str) -> str:
        """An output of the stage: a path inside the stage directory, or a reference kept as given (a hub id)."""
        value = self.manifest["outputs"][name]
        candidate = self.path / value
        return str(candidate) if candidate.exists() else value

    @property
    def stats(self) -> dict:
        return self.manifest.get("stats", {})

    @property
    def seconds(self) -> float:
        return float(self.manifest.get("seconds", 0.0))


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


UNKEYED_TRAINER_FIELDS = ("progress_bar", "num_threads")
"""Trainer fields no stage key holds: progress bars change no output; the thread count is set once per process
(`bench/reproduce.py --jobs` splits threads between workers) and changes only the order of float reductions."""
TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainerConfig) if f.name not in UNKEYED_TRAINER_FIELDS)
"""What a training stage reads of the trainer settings (through `fit` and `_optimizer`)."""


def trainer_key(trainer: TrainerConfig, fields: Sequence[str] = TRAINING_FIELDS) -> dict:
    """The trainer settings a stage reads, for its key (`run_stage` checks that nothing else was read)."""
    return {name: getattr(trainer, name) for name in fields}


class _ReadRecorder:
    """Reads through to a TrainerConfig and records which fields were read (so a stage cannot read one its key
    lacks without `run_stage` noticing)."""

    def __init__(self, target: TrainerConfig) -> None:
        self._target, self.read = target, set()

    def __getattr__(self, name: str) -> Any:
        self.read.add(name)
        return getattr(self._target, name)


def stage_key(name: str, config: dict, upstream: Sequence[StageResult]) -> str:
    """blake2b (12 hex digits) of the stage name, the pipeline version, its config and its inputs' hashes."""
    payload = {
        "version": PIPELINE_VERSION,
        "stage": name,
        "config": _canonical(config),
        "upstream": {u.label: u.key for u in upstream},
    }
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=6).hexdigest()


write_json_atomic = atomic_write_json
"""JSON through a temporary file and a rename: readers never see half a file."""


def say(message: str) -> None:
    """A pipeline progress line on stdout."""
    print(f"[madpo] {message}", flush=True)


@dataclass
class StageOutput:
    """What a stage body returns: named outputs (paths relative to the stage dir, or references) and statistics."""

    outputs: dict[str, str]
    stats: dict


@dataclass
class Context:
    """What every stage shares: where to write, how to train, and the log of stages run or found cached."""

    output_dir: Path
    trainer: TrainerConfig
    results: list[StageResult] = dataclasses.field(default_factory=list)

    @property
    def cache_dir(self) -> Path:
        """The DataModule's scoring cache (rm_margin, reference log-probs), shared by all stages: keyed by content."""
        return self.output_dir / "scoring-cache"

    @property
    def device(self) -> str:
        """Where sampling and evaluation run: cuda when the trainer's accelerator is (or auto-detects) a GPU."""
        import torch

        acc = self.trainer.accelerator
        if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
            return "cuda"
        return "cpu"

    def record(self, result: StageResult) -> None:
        if all(r.path != result.path for r in self.results):
            self.results.append(result)


def run_stage(
    ctx: Context,
    name: str,
    config: dict,
    upstream: Sequence[StageResult],
    body: Callable[[Path], StageOutput],
    *,
    label: str | None = None,
) -> StageResult:
    """Run `body(stage_dir)` unless the stage is already finished; write its manifest last (atomically)."""
    label = label or name
    key = stage_key(name, config, upstream)
    path = ctx.output_dir / f"{label}-{key}"
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        result = StageResult(name, label, path, key, manifest, cached=True)
        say(f"stage {label}: cached ({path}, took {result.seconds:.1f} s when it ran)")
        ctx.record(result)
        return result
    if path.exists():
        say(f"stage {label}: {path} has no {MANIFEST} (an interrupted run): redoing it")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    say(f"stage {label}: running -> {path}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), _load()
    trainer, recorder = ctx.trainer, _ReadRecorder(ctx.trainer)
    ctx.trainer = recorder  # type: ignore[assignment]
    try:
        out = body(path)
    except StageError:
        raise
    except Exception as e:
        context = f"[{label}] " if label != name else ""
        raise StageError(f"stage {name}: {context}{e}") from e
    finally:
        ctx.trainer = trainer
    unkeyed = sorted(recorder.read - set(config.get("trainer", {})) - set(UNKEYED_TRAINER_FIELDS))
    if unkeyed:  # a programming error: the cache would serve this stage's output for other values of these fields
        shutil.rmtree(path)
        raise RuntimeError(f"stage {name}: read trainer.{', trainer.'.join(unkeyed)}, which its cache key lacks")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    manifest = {
        "stage": name,
        "label": label,
        "key": key,
        "pipeline_version": PIPELINE_VERSION,
        "config": _canonical(config),
        "upstream": {u.label: {"key": u.key, "path": str(u.path)} for u in upstream},
        "outputs": out.outputs,
        "stats": out.stats,
        "started": started,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "load_average": {"start": load_start, "end": _load()},
        "torch_threads": _torch_threads(),
        "versions": _versions(),
    }
    write_json_atomic(manifest_path, manifest)
    say(f"stage {label}: done in {seconds:.1f} s")
    result = StageResult(name, label, path, key, json.loads(manifest_path.read_text()), cached=False)
    ctx.record(result)
    return result


def _load() -> float | None:
    """The 1-minute load average (how busy the machine was: timings on a shared machine need it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _versions() -> dict[str, str]:
    import lightning
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
    }


# ------------------------------------------------------------------------------------------------------------------
# Shared helpers: reading upstream outputs, training with lightning.Trainer
# ------------------------------------------------------------------------------------------------------------------


def load_reviews(reviews: StageResult) -> Any:
    """The saved reviews dataset (`text`, `label`) of the reviews stage."""
    import datasets

    return datasets.load_from_disk(reviews.output("reviews"))


def load_slices(reviews: StageResult) -> Any:
    from madpo.pipeline.reviews import ImdbSlices

    raw = json.loads(Path(reviews.output("slices")).read_text())
    return ImdbSlices(**{k: tuple(v) for k, v in raw.items()})


def load_oracle(oracle: StageResult, cfg: OracleConfig, device: str = "cpu") -> Any:
    """The oracle of the oracle stage (the TF-IDF model from disk; VADER / HF rebuilt), with its accuracy set."""
    from madpo.pipeline.oracle import HFClassifierOracle, TfidfOracle, VaderOracle

    if cfg.kind == "tfidf":
        return TfidfOracle.load(oracle.output("oracle"))
    if cfg.kind == "vader":
        built: Any = VaderOracle()
    else:
        built = HFClassifierOracle(
            str(cfg.model),
            cfg.positive_label,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            device=device,
        )
    built.heldout_accuracy = oracle.stats.get("heldout_accuracy")
    built.n_heldout = oracle.stats.get("n_heldout")
    return built


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


write_jsonl = atomic_write_jsonl


def check_prompt_lengths(prompts: Sequence[str], tokenizer: Any, max_prompt_length: int, what: str) -> None:
    """Stop (naming the row) when a prompt is longer than the prompt budget: the DataModule would drop or cut it."""
    from madpo.pipeline.generate import encode_prompt

    for i, prompt in enumerate(prompts):
        n = len(encode_prompt(tokenizer, prompt))
        if n > max_prompt_length:
            raise ValueError(
                f"{what} row {i}: the prompt has {n} tokens (BOS included), more than the maximum prompt length "
                f"{max_prompt_length}; prompt starts {prompt[:80]!r}"
            )


def quiet_libraries() -> None:
    """Keep the console to the pipeline's lines and the progress bars that matter (training, sampling): no
    weight-loading bars or load reports from transformers, no per-map bars from datasets, no Lightning chatter."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    _quiet_lightning()


def _quiet_lightning() -> None:
    for pattern in (
        r".*does not have many workers.*",
        r".*The number of training batches .* is smaller than the logging interval.*",
        r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fit(
    ctx: Context,
    stage_dir: Path,
    module: Any,
    datamodule: Any,
    *,
    n_train_rows: int,
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    accumulate_grad_batches: int = 1,
    has_val: bool,
    val_every_n_steps: int | None = None,
    early_stopping_patience: int | None = None,
) -> dict:
    """Train `module` on `datamodule` with one `lightning.Trainer` (TensorBoard under the stage dir, progress bar,
    `DestroyProcessGroup`), validating once at the end, or every `val_every_n_steps` optimiser steps keeping the
    best weights (lowest val/loss) and optionally stopping early. Returns the final metrics and the data statistics."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from madpo.callbacks import DestroyProcessGroup, KeepBestWeights, PairThroughput

    _quiet_lightning()
    if n_train_rows < 1:
        raise ValueError("no training rows")
    batches_per_epoch = math.ceil(n_train_rows / batch_size)
    total_batches = epochs * batches_per_epoch
    if max_steps:
        total_batches = min(total_batches, max_steps * accumulate_grad_batches)
    callbacks: list[Any] = [DestroyProcessGroup(), PairThroughput()]
    if ctx.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 25))
    if early_stopping_patience is not None and not val_every_n_steps:
        raise ValueError("early_stopping_patience needs val_every_n_steps (validation during training)")
    val_interval = total_batches
    keep_best = None
    if has_val and val_every_n_steps:
        val_interval = min(total_batches, val_every_n_steps * accumulate_grad_batches)
        keep_best = KeepBestWeights(monitor="val/loss", mode="min")
        callbacks.append(keep_best)
        if early_stopping_patience is not None:
            callbacks.append(
                EarlyStopping(
                    monitor="val/loss", mode="min", patience=early_stopping_patience, check_on_train_epoch_end=False
                )
            )
    trainer = L.Trainer(
        accelerator=ctx.trainer.accelerator,
        devices=ctx.trainer.devices,
        precision=ctx.trainer.precision,
        max_epochs=epochs,
        max_steps=max_steps or -1,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=ctx.trainer.gradient_clip_val,
        logger=TensorBoardLogger(save_dir=str(stage_dir), name="tensorboard", version=0, default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=ctx.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=val_interval if has_val else None,
        limit_val_batches=1.0 if has_val else 0,
        log_every_n_steps=min(ctx.trainer.log_every_n_steps, max(1, total_batches // accumulate_grad_batches)),
        default_root_dir=str(stage_dir),
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 0)() == 1}
    best = {}
    if keep_best is not None and keep_best.best_step is not None:
        # the exported weights are the best ones: report their validation metrics, and the last ones beside them
        best = {
            "best_step": keep_best.best_step,
            "last_val_metrics": {k: metrics.get(k) for k in keep_best.best_metrics},
        }
        metrics.update(keep_best.best_metrics)
    return {
        "metrics": {k: metrics[k] for k in sorted(metrics)},
        **best,
        "global_step": int(trainer.global_step),
        "epochs_run": int(trainer.current_epoch),
        "data": datamodule.stats,
    }


def _optimizer(ctx: Context, lr: float, warmup_ratio: float, schedule: str = "cosine") -> Any:
    from madpo.modules.base import OptimizerOptions

    # Lightning refuses gradient clipping with a fused optimizer under mixed precision: use the foreach AdamW there
    fused = False if "mixed" in ctx.trainer.precision and ctx.trainer.gradient_clip_val else None
    return OptimizerOptions(lr=lr, warmup_ratio=warmup_ratio, schedule=schedule, fused=fused)


def _seed(seed: int) -> None:
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)


def _dataset(rows: Sequence[dict], columns: Sequence[str]) -> Any:
    import datasets

    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns})


# ------------------------------------------------------------------------------------------------------------------
# 1. reviews
# ------------------------------------------------------------------------------------------------------------------


def stage_reviews(ctx: Context, cfg: DataConfig) -> StageResult:
    """The 25,000 labelled IMDB reviews (saved as a `datasets` dir) and the slices of them (slices.json)."""
    config = {
        k: getattr(cfg, k) for k in ("source", "n_prompts", "n_sft", "n_oracle_train", "n_oracle_heldout", "seed")
    }

    def body(path: Path) -> StageOutput:
        from madpo.pipeline.reviews import imdb_slices, load_imdb_reviews

        reviews = load_imdb_reviews(cfg.source)
        slices = imdb_slices(
            reviews["label"],
            n_prompts=cfg.n_prompts,
            n_sft=cfg.n_sft,
            n_oracle_train=cfg.n_oracle_train,
            n_oracle_heldout=cfg.n_oracle_heldout,
            seed=cfg.seed,
        )
        for part in ("prompts", "sft"):
            if not getattr(slices, part):
                raise ValueError(f"the {part} slice is empty (data.n_{part}=0): nothing to train or sample from")
        reviews.save_to_disk(str(path / "reviews"))
        write_json_atomic(path / "slices.json", dataclasses.asdict(slices))
        labels = np.asarray(reviews["label"])
        return StageOutput(
            {"reviews": "reviews", "slices": "slices.json"},
            {"n_reviews": len(reviews), "n_positive": int(labels.sum()), "slices": slices.describe()},
        )

    return run_stage(ctx, "reviews", config, [], body)


# ------------------------------------------------------------------------------------------------------------------
# 2. tokenizer
# ------------------------------------------------------------------------------------------------------------------


def stage_tokenizer(ctx: Context, cfg: BaseModelConfig, reviews: StageResult) -> StageResult:
    """A byte-level BPE trained on the reviews (from scratch), or the pretrained model's tokenizer, saved."""
    if cfg.name_or_path is None:
        config: dict = {"vocab_size": cfg.vocab_size, "tokenizer_reviews": cfg.tokenizer_reviews}
    else:
        config = {"name_or_path": cfg.name_or_path, "gguf_file": cfg.gguf_file}
    upstream = [reviews]

    def body(path: Path) -> StageOutput:
        from madpo.modeling import load_tokenizer, train_bpe_tokenizer

        out = path / "tokenizer"
        if cfg.name_or_path is None:
            texts = list(load_reviews(reviews)["text"])
            if cfg.tokenizer_reviews is not None:
                texts = texts[: cfg.tokenizer_reviews]
            tokenizer = train_bpe_tokenizer(texts, out, vocab_size=cfg.vocab_size)
            tokenizer = load_tokenizer(str(out))
        else:
            if cfg.gguf_file:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(cfg.location(), gguf_file=cfg.gguf_file)
                if tokenizer.pad_token_id is None:
                    tokenizer.pad_token = tokenizer.eos_token
            else:
                tokenizer = load_tokenizer(cfg.location())
            tokenizer.save_pretrained(str(out))
            texts = list(load_reviews(reviews)["text"][:1000])
        sample = texts[:1000]
        lengths = [len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"]] if sample else [0]
        return StageOutput(
            {"tokenizer": "tokenizer"},
            {
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "mean_tokens_per_review": float(np.mean(lengths)),
            },
        )

    return run_stage(ctx, "tokenizer", config, upstream, body)


# ------------------------------------------------------------------------------------------------------------------
# 3. oracle
# ------------------------------------------------------------------------------------------------------------------


def stage_oracle(
    ctx: Context, cfg: OracleConfig, snippet_tokens: int, reviews: StageResult, tokenizer: StageResult
) -> StageResult:
    """Train (TF-IDF) or load (VADER, HF) the oracle; its accuracy on held-out reviews, whole and cut to
    `snippet_tokens` tokens (the length of prompt + continuation it will score)."""
    config = {**dataclasses.asdict(cfg), "snippet_tokens": snippet_tokens}
    if cfg.kind != "tfidf":
        config = {k: v for k, v in config.items() if k not in ("ngram_max", "min_df", "C")}
    if cfg.kind == "hf":  # the classifier runs on the trainer's device
        config["trainer"] = trainer_key(ctx.trainer, ("accelerator",))

    def body(path: Path) -> StageOutput:
        from madpo.modeling import load_tokenizer
        from madpo.pipeline.oracle import HFClassifierOracle, TfidfOracle, VaderOracle, oracle_accuracy

        data, slices = load_reviews(reviews), load_slices(reviews)
        if not slices.oracle_heldout:
            raise ValueError("data.n_oracle_heldout=0: the oracle's accuracy cannot be measured")
        held_texts, held_labels = slices.texts(data, "oracle_heldout"), slices.labels(data, "oracle_heldout")
        outputs: dict[str, str] = {}
        start = time.perf_counter()
        if cfg.kind == "tfidf":
            oracle: Any = TfidfOracle.fit(
                slices.texts(data, "oracle_train"),
                slices.labels(data, "oracle_train"),
                heldout_texts=held_texts,
                heldout_labels=held_labels,
                cache_dir=path,
                ngram_max=cfg.ngram_max,
                min_df=cfg.min_df,
                C=cfg.C,
            )
            outputs["oracle"] = f"tfidf-{oracle.meta['cache_key']}"
        else:
            oracle = (
                VaderOracle()
                if cfg.kind == "vader"
                else HFClassifierOracle(
                    str(cfg.model),
                    cfg.positive_label,
                    batch_size=cfg.batch_size,
                    max_length=cfg.max_length,
                    device=ctx.device,
                )
            )
            oracle.measure_accuracy(held_texts, held_labels)
        seconds = time.perf_counter() - start
        tok = load_tokenizer(tokenizer.output("tokenizer"))
        ids = tok(held_texts, add_special_tokens=False)["input_ids"]
        snippets = tok.batch_decode(
            [i[:snippet_tokens] for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        snippet_acc = oracle_accuracy(oracle, snippets, held_labels)
        stats = {
            **oracle.describe(),
            "heldout_accuracy": oracle.heldout_accuracy,
            "n_heldout": oracle.n_heldout,
            "snippet_tokens": snippet_tokens,
            "snippet_accuracy": snippet_acc,
            "seconds_train_and_measure": round(seconds, 2),
        }
        say(
            f"oracle {cfg.kind}: held-out accuracy {oracle.heldout_accuracy:.3f} on {len(held_texts)} full reviews, "
            f"{snippet_acc:.3f} on their first {snippet_tokens} tokens"
        )
        return StageOutput(outputs, stats)

    return run_stage(ctx, "oracle", config, [reviews, tokenizer], body)


# ------------------------------------------------------------------------------------------------------------------
# 4. base model
# ------------------------------------------------------------------------------------------------------------------


def _lm_config(cfg: BaseModelConfig) -> dict:
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }


def stage_base_model(ctx: Context, cfg: BaseModelConfig, reviews: StageResult, tokenizer: StageResult) -> StageResult:
    """From scratch: a Llama of the configured shape, trained as an LM on the start of every review outside the
    oracle's held-out slice (prompt = "" i.e. BOS, completion = the review), with a validation NLL on held-out
    reviews. Pretrained: the model as given (a GGUF file converted once into a transformers directory)."""
    if cfg.name_or_path is not None:
        config: dict = {"name_or_path": cfg.name_or_path, "gguf_file": cfg.gguf_file}
    else:
        config = {
            **dataclasses.asdict(cfg),
            "trainer": trainer_key(ctx.trainer),
        }
        config.pop("name_or_path")
        config.pop("gguf_file")

    def pretrained(path: Path) -> StageOutput:
        if not cfg.gguf_file:
            return StageOutput({"model": str(cfg.location())}, {"pretrained": cfg.name_or_path})
        import torch
        from transformers import AutoModelForCausalLM

        from madpo.modeling import load_tokenizer

        gguf = AutoModelForCausalLM.from_pretrained(cfg.location(), gguf_file=cfg.gguf_file, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model ("not serializable"): move its dequantised weights into a
        # plain model of the same config and save that (identical logits)
        model_config = gguf.config
        if hasattr(model_config, "quantization_config"):
            del model_config.quantization_config
        model = type(gguf)(model_config)
        model.load_state_dict(gguf.state_dict())
        model.save_pretrained(str(path / "model"))
        load_tokenizer(tokenizer.output("tokenizer")).save_pretrained(str(path / "model"))
        n_params = sum(p.numel() for p in model.parameters())
        return StageOutput(
            {"model": "model"}, {"pretrained": f"{cfg.name_or_path}/{cfg.gguf_file}", "params": n_params}
        )

    def from_scratch(path: Path) -> StageOutput:
        from madpo.data import PreferenceDataModule
        from madpo.losses import SFTLoss
        from madpo.modeling import build_causal_lm, load_tokenizer
        from madpo.modules.policy import PolicyLightningModule

        _seed(cfg.seed)
        tok = load_tokenizer(tokenizer.output("tokenizer"))
        model = build_causal_lm(tok, seed=cfg.seed, **_lm_config(cfg))
        n_params = sum(p.numel() for p in model.parameters())
        init = path / "init"
        model.save_pretrained(str(init))
        tok.save_pretrained(str(init))
        del model
        data, slices = load_reviews(reviews), load_slices(reviews)
        held = set(slices.oracle_heldout)
        chars = cfg.lm_seq_len * 8  # plenty for lm_seq_len tokens; spares tokenizing whole reviews
        train_texts = [t[:chars] for i, t in enumerate(data["text"]) if i not in held]
        val_texts = [t[:chars] for t in slices.texts(data, "oracle_heldout")[: cfg.lm_val_reviews]]
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(train_texts))  # mix positives and negatives (IMDB order is sorted by label)
        n_needed = min(len(train_texts), cfg.lm_steps * cfg.lm_batch_size)
        train_texts = [train_texts[i] for i in order[:n_needed]]
        say(
            f"base model: Llama {n_params / 1e6:.2f}M parameters, {cfg.lm_steps} steps x {cfg.lm_batch_size} "
            f"sequences x {cfg.lm_seq_len} tokens, lr {cfg.lm_lr:g}"
        )

        def sft_rows(texts: list[str]) -> Any:
            return _dataset([{"prompt": "", "completion": t} for t in texts], ("prompt", "completion"))

        module = PolicyLightningModule(
            str(init),
            loss=SFTLoss(),
            optimizer=_optimizer(ctx, cfg.lm_lr, cfg.lm_warmup_ratio),
            export_dir=str(path / "model"),
        )
        dm = PreferenceDataModule.from_datasets(
            sft_rows(train_texts),
            sft_rows(val_texts) if val_texts else None,
            tokenizer=str(init),
            max_length=cfg.lm_seq_len,
            max_prompt_length=min(4, cfg.lm_seq_len - 1),
            batch_size=cfg.lm_batch_size,
            seed=cfg.seed,
            cache_dir=str(ctx.cache_dir),
        )
        result = fit(
            ctx,
            path,
            module,
            dm,
            n_train_rows=len(train_texts),
            batch_size=cfg.lm_batch_size,
            epochs=max(1, math.ceil(cfg.lm_steps * cfg.lm_batch_size / len(train_texts))),
            max_steps=cfg.lm_steps,
            has_val=bool(val_texts),
        )
        shutil.rmtree(init)
        return StageOutput({"model": "model"}, {"params": n_params, "n_train_reviews": len(train_texts), **result})

    return run_stage(
        ctx,
        "base_model",
        config,
        [tokenizer] if cfg.name_or_path is not None else [reviews, tokenizer],
        pretrained if cfg.name_or_path is not None else from_scratch,
    )


# ------------------------------------------------------------------------------------------------------------------
# 5. SFT
# ------------------------------------------------------------------------------------------------------------------


def stage_sft(ctx: Context, cfg: SftConfig, prompt_tokens: int, reviews: StageResult, base: StageResult) -> StageResult:
    """SFT on the positive reviews: prompt = the first `prompt_tokens` tokens, completion = the rest (cut to
    `max_length`), token-mean NLL on the completion only. The last `n_val` reviews validate."""
    config = {
        **dataclasses.asdict(cfg),
        "prompt_tokens": prompt_tokens,
        "trainer": trainer_key(ctx.trainer),
    }

    def body(path: Path) -> StageOutput:
        from madpo.data import PreferenceDataModule
        from madpo.losses import SFTLoss
        from madpo.modeling import load_tokenizer
        from madpo.modules.policy import PolicyLightningModule
        from madpo.pipeline.generate import split_review

        _seed(cfg.seed)
        base_path = base.output("model")
        tok = load_tokenizer(base_path)
        data, slices = load_reviews(reviews), load_slices(reviews)
        rows, n_short = [], 0
        for text in slices.texts(data, "sft"):
            prompt, completion = split_review(text, tok, prompt_tokens, 2 * cfg.max_length)
            if not completion.strip():
                n_short += 1
                continue
            rows.append({"prompt": prompt, "completion": completion})
        if n_short:
            log.warning("sft: skipped %d review(s) no longer than the %d prompt tokens", n_short, prompt_tokens)
        n_val = min(cfg.n_val, len(rows) // 2)
        train, val = rows[: len(rows) - n_val], rows[len(rows) - n_val :]
        if not train:
            raise ValueError("no SFT reviews to train on (data.n_sft is too small)")
        max_prompt = prompt_tokens + 8
        check_prompt_lengths([r["prompt"] for r in train + val], tok, max_prompt, "sft review")
        module = PolicyLightningModule(
            base_path,
            loss=SFTLoss(),
            optimizer=_optimizer(ctx, cfg.lr, cfg.warmup_ratio),
            lora=cfg.lora,
            export=cfg.lora is None,
            export_dir=str(path / "model"),
        )
        dm = PreferenceDataModule.from_datasets(
            _dataset(train, ("prompt", "completion")),
            _dataset(val, ("prompt", "completion")) if val else None,
            tokenizer=base_path,
            max_length=cfg.max_length,
            max_prompt_length=max_prompt,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            cache_dir=str(ctx.cache_dir),
        )
        result = fit(
            ctx,
            path,
            module,
            dm,
            n_train_rows=len(train),
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            accumulate_grad_batches=cfg.accumulate_grad_batches,
            has_val=bool(val),
        )
        if cfg.lora is not None:  # the reference and the policy's starting point: base + SFT adapter, merged
            module.export(str(path / "model"), merge_adapter=True)
        return StageOutput(
            {"model": "model"}, {"n_train": len(train), "n_val": len(val), "n_skipped_short": n_short, **result}
        )

    return run_stage(ctx, "sft", config, [reviews, base], body)


# ------------------------------------------------------------------------------------------------------------------
# 6. pairs
# ------------------------------------------------------------------------------------------------------------------


def _score_column(oracle: Any, prompts: Sequence[str], continuations: Sequence[str], column: str) -> np.ndarray:
    from madpo.pipeline.oracle import checked_scores

    try:
        return checked_scores(oracle, [p + c for p, c in zip(prompts, continuations, strict=True)])
    except ValueError as e:
        raise ValueError(f"scoring prompt + {column} (row = prompt row): {e}") from e


def _composition(rows: Sequence[dict]) -> dict[str, int]:
    """How many pairs of each kind: 'sample vs sample' or 'sample vs original' (sources of the two texts)."""

    def kind(row: dict) -> str:
        sources = sorted(
            s.replace("sample1", "sample").replace("sample2", "sample")
            for s in (row["chosen_source"], row["rejected_source"])
        )
        return " vs ".join(sources)

    return dict(sorted(Counter(kind(r) for r in rows).items()))


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "sd": float(values.std()), "frac_positive": float((values > 0).mean())}


def stage_pairs(
    ctx: Context,
    cfg: PairsConfig,
    prompt_tokens: int,
    oracle_cfg: OracleConfig,
    reviews: StageResult,
    oracle: StageResult,
    sft: StageResult,
) -> StageResult:
    """Prompts (first `prompt_tokens` tokens of the negative prompt reviews) -> two samples each from the SFT model ->
    oracle scores of prompt + sample and of prompt + the original continuation (same token budget) -> the three
    tiers -> seeded shuffle, Gumbel-noise BT labels, train/eval split -> `pairs/<tier>/{train,eval}.jsonl`."""
    config = {**dataclasses.asdict(cfg), "prompt_tokens": prompt_tokens}
    config["trainer"] = trainer_key(ctx.trainer, ("accelerator",))  # sampling runs on the trainer's device

    def body(path: Path) -> StageOutput:
        from madpo.modeling import load_causal_lm, load_tokenizer
        from madpo.pipeline.generate import decode_continuation, sample_continuation_ids, split_review
        from madpo.pipeline.tiers import build_tiers, label_noise_stats, make_preference_splits

        data, slices = load_reviews(reviews), load_slices(reviews)
        sft_path = sft.output("model")
        tok = load_tokenizer(sft_path)
        prompts, originals = [], []
        for text in slices.texts(data, "prompts"):
            prompt, original = split_review(text, tok, prompt_tokens, cfg.max_new_tokens)
            prompts.append(prompt)
            originals.append(original)
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompt row {i} (review {slices.prompts[i]}) is empty")
        model = load_causal_lm(sft_path, pad_token_id=tok.pad_token_id).to(ctx.device)
        ids, gen_stats = sample_continuation_ids(
            model,
            tok,
            prompts,
            num_samples=cfg.samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            device=ctx.device,
            progress=ctx.trainer.progress_bar,
            desc="sampling pairs",
        )
        del model
        sample1 = [decode_continuation(tok, s[0]) for s in ids]
        sample2 = [decode_continuation(tok, s[1]) for s in ids]
        say(f"pairs: sampled {gen_stats['n_sequences']} continuations at {gen_stats['tokens_per_s']} tokens/s")
        orc = load_oracle(oracle, oracle_cfg, ctx.device)
        r1 = _score_column(orc, prompts, sample1, "sample1")
        r2 = _score_column(orc, prompts, sample2, "sample2")
        r_orig = _score_column(orc, prompts, originals, "original")
        write_jsonl(
            path / "samples.jsonl",
            [
                {
                    "prompt_index": i,
                    "review_row": slices.prompts[i],
                    "prompt": p,
                    "sample1": a,
                    "sample2": b,
                    "original": o,
                    "oracle_sample1": x,
                    "oracle_sample2": y,
                    "oracle_original": z,
                }
                for i, (p, a, b, o, x, y, z) in enumerate(
                    zip(prompts, sample1, sample2, originals, r1, r2, r_orig, strict=True)
                )
            ],
        )
        tiers = build_tiers(prompts, sample1, sample2, originals, r1, r2, r_orig)
        splits, report = make_preference_splits(
            tiers, n_eval=cfg.n_eval, n_train=cfg.n_train, shuffle_seed=cfg.shuffle_seed, label_seed=cfg.label_seed
        )
        outputs: dict[str, str] = {}
        for tier, parts in splits.items():
            for split, rows in parts.items():
                kept = [r for r in rows if r["chosen"].strip() and r["rejected"].strip()]
                empty = len(rows) - len(kept)
                if empty:
                    log.warning("tier %s/%s: dropped %d pair(s) with an empty continuation", tier, split, empty)
                if not kept:
                    raise ValueError(f"tier {tier}/{split}: no pairs left (all identical or empty)")
                write_jsonl(path / "pairs" / tier / f"{split}.jsonl", kept)
                outputs[f"{tier}/{split}"] = f"pairs/{tier}/{split}.jsonl"
                entry = report["tiers"][tier][split]
                entry["dropped_empty"] = empty
                entry.update({k: v for k, v in label_noise_stats(kept).items() if k != "n"})
                entry["n"] = len(kept)
                entry["composition"] = _composition(kept)
        # evaluation prompts: the held-out rows of the shuffle every tier shares (whatever was dropped per tier)
        n = len(prompts)
        order = np.random.default_rng(cfg.shuffle_seed).permutation(n)
        eval_rows = [int(i) for i in order[n - cfg.n_eval :]]
        for tier, parts in splits.items():
            if not {r["prompt_index"] for r in parts["eval"]} <= set(eval_rows):
                raise RuntimeError(f"tier {tier}: eval pairs outside the shared held-out prompts")
        write_jsonl(
            path / "eval_prompts.jsonl",
            [
                {"prompt_index": i, "prompt": prompts[i], "original": originals[i], "oracle_original": r_orig[i]}
                for i in eval_rows
            ],
        )
        outputs["eval_prompts"] = "eval_prompts.jsonl"
        outputs["samples"] = "samples.jsonl"
        identical = sum(a == b for a, b in zip(sample1, sample2, strict=True))
        report.update(
            {
                "generation": gen_stats,
                "oracle_scores": {"sample1": _summary(r1), "sample2": _summary(r2), "original": _summary(r_orig)},
                "identical_sample_pairs": int(identical),
                "empty_samples": int(sum(not s.strip() for s in sample1 + sample2)),
            }
        )
        write_json_atomic(path / "report.json", report)
        outputs["report"] = "report.json"
        for tier in TIER_NAMES:
            t = report["tiers"][tier]["train"]
            say(
                f"pairs: tier {tier}: {t['n']} train pairs {t['composition']}, labels disagree with the oracle on "
                f"{t['frac_disagree']:.1%}, mean |oracle gap| {t['mean_abs_oracle_gap']:.2f}"
            )
        return StageOutput(outputs, report)

    return run_stage(ctx, "pairs", config, [reviews, oracle, sft], body)


def load_pairs(pairs: StageResult, tier: str, split: str) -> list[dict]:
    return read_jsonl(pairs.output(f"{tier}/{split}"))


# ------------------------------------------------------------------------------------------------------------------
# 7. reward model
# ------------------------------------------------------------------------------------------------------------------

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def _pair_data(
    pairs: StageResult, tier: str, n_val: int | None, tokenizer: Any, max_prompt_length: int
) -> tuple[Any, Any, list[dict], int]:
    train = load_pairs(pairs, tier, "train")
    val = load_pairs(pairs, tier, "eval")
    val = val[:n_val] if n_val is not None else val
    check_prompt_lengths([r["prompt"] for r in train], tokenizer, max_prompt_length, f"pairs/{tier}/train")
    check_prompt_lengths([r["prompt"] for r in val], tokenizer, max_prompt_length, f"pairs/{tier}/eval")
    return (
        _dataset(train, PAIR_COLUMNS),
        _dataset(val, PAIR_COLUMNS) if val else None,
        train,
        len(val),
    )


def margin_stats(margins: Sequence[float], index: Sequence[int], rows: Sequence[dict], tau: float) -> dict:
    """How the reward model's margins m on the training pairs fall into MADPO's weight regions, and how well they
    agree with the (noisy) labels and with the oracle: the diagnostics behind "which part of w(m) matters"."""
    m = np.asarray(margins, dtype=np.float64)
    gap = np.asarray([rows[i]["oracle_chosen"] - rows[i]["oracle_rejected"] for i in index], dtype=np.float64)
    if m.size == 0:
        return {"n": 0}
    informative = gap != 0
    corr = float(np.corrcoef(m, gap)[0, 1]) if m.size > 1 and m.std() > 0 and gap.std() > 0 else None
    return {
        "n": int(m.size),
        "mean": float(m.mean()),
        "sd": float(m.std()),
        "frac_capped_below_minus_tau": float((m <= -tau).mean()),
        "frac_downweighted_negative": float(((m > -tau) & (m < 0)).mean()),
        "frac_amplified_0_to_tau": float(((m > 0) & (m < tau)).mean()),
        "frac_damped_above_tau": float((m >= tau).mean()),
        "agrees_with_label": float((m > 0).mean()),
        "agrees_with_oracle": float((np.sign(m[informative]) == np.sign(gap[informative])).mean())
        if informative.any()
        else None,
        "corr_with_oracle_gap": corr,
    }


def _trainer_scoring_context(ctx: Context) -> tuple[Any, Any, str]:
    """The (device, forward context, precision) that `fit`'s Trainer gives the DataModule's scoring, read off a
    Trainer built with the same accelerator, devices and precision: margins scored before `fit` then equal, and share
    the cache of, margins the DataModule would score inside it."""
    import lightning as L

    from madpo.scoring import scoring_context

    _quiet_lightning()
    trainer = L.Trainer(
        accelerator=ctx.trainer.accelerator,
        devices=ctx.trainer.devices,
        precision=ctx.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return scoring_context(trainer)


def score_rm_margins(
    ctx: Context,
    reward: StageResult,
    tok: Any,
    splits: dict[str, Any],
    lengths: tuple[int, int],
    *,
    under_trainer: bool,
) -> tuple[dict[str, Any], dict[str, dict]]:
    """`(tokenized, stats)`: each split of text pairs tokenized as `PreferenceDataModule` tokenizes it, with the
    reward model's `rm_margin` (`madpo.scoring.attach_rm_margins`, the stages' scoring cache), and its scoring stats
    (`source`, `cache`, `mean`). `under_trainer`: on the device and at the precision of the stage's Trainer (what the
    policy reads), else on the CPU in float32."""
    from madpo.data.collate import PreferenceCollator
    from madpo.data.formats import load_in_memory
    from madpo.data.tokenize import tokenize_dataset
    from madpo.modeling import state_fingerprint
    from madpo.scoring import attach_rm_margins, open_reward_model, scoring_context

    max_prompt_length, max_length = lengths
    device, forward_context, precision = _trainer_scoring_context(ctx) if under_trainer else scoring_context(None)
    path = reward.output("model")
    tokenized: dict[str, Any] = {}
    stats: dict[str, dict] = {}
    with open_reward_model(path, tok, device=device) as reward_model:
        model_fingerprint = state_fingerprint(reward_model)
        for split, rows in splits.items():
            ds, _ = tokenize_dataset(
                load_in_memory(rows), tok, max_length=max_length, max_prompt_length=max_prompt_length, split=split
            )
            stats[split] = {"source": f"reward_model={path}"}
            tokenized[split] = attach_rm_margins(
                ds,
                reward_model,
                PreferenceCollator(tok.pad_token_id),
                cache_dir=ctx.cache_dir,
                tokenizer=tok,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                precision=precision,
                model_fingerprint=model_fingerprint,
                device=device,
                forward_context=forward_context,
                stats=stats[split],
            )
    return tokenized, stats


def _with_rm_margin(rows: Any, index: Sequence[int], rm_margin: Sequence[float]) -> Any:
    """Text pairs `rows` with an `rm_margin` column: `rm_margin[k]` on row `index[k]` (the tokenized rows' `index`).
    A row tokenization dropped gets 0.0: the DataModule tokenizes identically, so drops it again."""
    values = [0.0] * len(rows)
    for i, m in zip(index, rm_margin, strict=True):
        values[i] = float(m)
    return rows.add_column("rm_margin", values)


def stage_reward(
    ctx: Context,
    cfg: RewardConfig,
    tier: str,
    lengths: tuple[int, int],
    base: StageResult,
    pairs: StageResult,
) -> StageResult:
    """A Bradley–Terry reward model on the tier's training pairs, initialised from the base LM (the paper's RM
    starts from the base model), validated on the first `n_val` eval pairs."""
    max_prompt_length, max_length = lengths
    config = {
        **dataclasses.asdict(cfg),
        "tier": tier,
        "max_prompt_length": max_prompt_length,
        "max_length": max_length,
        "trainer": trainer_key(ctx.trainer),
    }

    def body(path: Path) -> StageOutput:
        from madpo.data import PreferenceDataModule
        from madpo.modeling import load_tokenizer
        from madpo.modules.reward import RewardLightningModule

        _seed(cfg.seed)
        base_path = base.output("model")
        tok = load_tokenizer(base_path)
        train, val, train_rows, n_val = _pair_data(pairs, tier, cfg.n_val, tok, max_prompt_length)
        n_train = len(train_rows)
        module = RewardLightningModule(
            base_path,
            optimizer=_optimizer(ctx, cfg.lr, cfg.warmup_ratio),
            lora=cfg.lora,
            export_dir=str(path / "model"),
        )
        dm = PreferenceDataModule.from_datasets(
            train,
            val,
            tokenizer=base_path,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            cache_dir=str(ctx.cache_dir),
        )
        result = fit(
            ctx,
            path,
            module,
            dm,
            n_train_rows=n_train,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            accumulate_grad_batches=cfg.accumulate_grad_batches,
            has_val=val is not None,
            val_every_n_steps=cfg.val_every_n_steps,
            early_stopping_patience=cfg.early_stopping_patience,
        )
        acc = result["metrics"].get("val/accuracy")
        if acc is not None:
            say(f"reward model ({tier}): validation accuracy {acc:.3f} on {n_val} eval pairs (noisy labels)")
        return StageOutput({"model": "model"}, {"n_train": n_train, "n_val": n_val, **result})

    return run_stage(ctx, "reward", config, [base, pairs], body, label=f"reward-{tier}")


# ------------------------------------------------------------------------------------------------------------------
# 8. policy
# ------------------------------------------------------------------------------------------------------------------


def policy_label(cfg: PolicyConfig) -> str:
    label = f"policy-{cfg.name}-{cfg.tier}-s{cfg.seed}"
    if cfg.margin_noise_std or cfg.margin_flip_fraction:
        label += f"-noise{cfg.margin_noise_std:g}-flip{cfg.margin_flip_fraction:g}"
    return label


def stage_policy(
    ctx: Context,
    cfg: PolicyConfig,
    lengths: tuple[int, int],
    sft: StageResult,
    pairs: StageResult,
    reward: StageResult | None,
) -> StageResult:
    """The policy: `PolicyLightningModule(loss)` from the SFT model (also the reference, its log-probs
    precomputed by the DataModule), on the tier's training pairs; MADPO methods read the tier's reward-model
    margins (optionally perturbed for robustness runs). Same hyperparameters for every method."""
    if cfg.uses_margins and reward is None:
        raise StageError(f"stage policy: method {cfg.name} needs the tier's reward model")
    max_prompt_length, max_length = lengths
    # the loss enters as its class and its own options only (`method` is a preset that chose them), so a DPO key
    # never holds MADPO knobs
    config = {
        **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("method", "loss")},
        "loss": {"class": class_path(cfg.loss), **cfg.loss.init_args()},
        "max_prompt_length": max_prompt_length,
        "max_length": max_length,
        "trainer": trainer_key(ctx.trainer),
    }
    if not cfg.uses_margins:  # the margins' perturbation is irrelevant to a loss that reads no margins
        for k in ("margin_noise_std", "margin_flip_fraction"):
            config.pop(k)
    upstream = [sft, pairs] + ([reward] if cfg.uses_margins and reward is not None else [])

    def body(path: Path) -> StageOutput:
        from madpo.data import PreferenceDataModule
        from madpo.modeling import load_tokenizer
        from madpo.modules.policy import PolicyLightningModule
        from madpo.pipeline.margins import perturb_margins

        _seed(cfg.seed)
        sft_path = sft.output("model")
        tok = load_tokenizer(sft_path)
        train, val, train_rows, n_val = _pair_data(pairs, cfg.tier, cfg.n_val, tok, max_prompt_length)
        n_train = len(train_rows)
        module = PolicyLightningModule(
            sft_path,
            loss=copy.deepcopy(cfg.loss),  # a fresh copy: a stateful loss (β-DPO's EMAs) starts from zero
            optimizer=_optimizer(ctx, cfg.lr, cfg.warmup_ratio, cfg.schedule),
            lora=cfg.lora,
            export=cfg.lora is None,
            export_dir=str(path / "model"),
        )
        margin_data: dict[str, dict] = {}
        if cfg.uses_margins and reward is not None:
            # scored here rather than by the DataModule, so that a robustness run perturbs the training margins
            # before the DataModule reads them; the validation margins stay clean
            splits = {"train": train, **({"val": val} if val is not None else {})}
            scored, scoring = score_rm_margins(ctx, reward, tok, splits, lengths, under_trainer=True)
            margin_data = {split: {"rm_margin": split_stats} for split, split_stats in scoring.items()}
            rm_margin = scored["train"]["rm_margin"]
            if cfg.margin_noise_std or cfg.margin_flip_fraction:
                rm_margin, margin_data["train"]["margin_perturbation"] = perturb_margins(
                    rm_margin, noise_std=cfg.margin_noise_std, flip_fraction=cfg.margin_flip_fraction, seed=cfg.seed
                )
                say(f"policy: training rm_margin perturbed: {margin_data['train']['margin_perturbation']}")
            train = _with_rm_margin(train, scored["train"]["index"], rm_margin)
            if val is not None:
                val = _with_rm_margin(val, scored["val"]["index"], scored["val"]["rm_margin"])
        dm = PreferenceDataModule.from_datasets(
            train,
            val,
            tokenizer=sft_path,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            cache_dir=str(ctx.cache_dir),
        )
        result = fit(
            ctx,
            path,
            module,
            dm,
            n_train_rows=n_train,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            accumulate_grad_batches=cfg.accumulate_grad_batches,
            has_val=val is not None,
        )
        if cfg.lora is not None:
            module.export(str(path / "model"), merge_adapter=True)
        stats = {"n_train": n_train, "n_val": n_val, **result}
        for split, extra in margin_data.items():  # beside the DataModule's own counts, where it put them before
            stats["data"].setdefault(split, {}).update(extra)
        ds = dm.train_dataset
        if cfg.uses_margins and ds is not None and "rm_margin" in ds.column_names:
            stats["margins"] = margin_stats(
                ds["rm_margin"], ds["index"], train_rows, getattr(cfg.loss, "tau", DEFAULT_TAU)
            )
            say(f"policy: reward-model margins on the training pairs: {stats['margins']}")
        return StageOutput({"model": "model"}, stats)

    return run_stage(ctx, "policy", config, upstream, body, label=policy_label(cfg))


# ------------------------------------------------------------------------------------------------------------------
# 9. evaluate
# ------------------------------------------------------------------------------------------------------------------


def stage_evaluate(
    ctx: Context,
    cfg: EvaluateConfig,
    n_prompts: int,
    oracle_cfg: OracleConfig,
    model: StageResult,
    sft: StageResult,
    oracle: StageResult,
    pairs: StageResult,
) -> StageResult:
    """One sampled continuation per held-out prompt from `model`, scored by the oracle (mean ± SE, 95 % CI), the KL
    to the SFT reference on the same samples (0 for the SFT model itself) and a few examples: results.json/.md in
    the stage dir and TensorBoard scalars + a text table."""
    is_sft = model.path == sft.path
    config = {**dataclasses.asdict(cfg), "n_prompts": n_prompts}
    config["trainer"] = trainer_key(ctx.trainer, ("accelerator",))  # sampling runs on the trainer's device
    label = "evaluate-sft" if is_sft else model.label.replace("policy-", "evaluate-", 1)
    upstream = [model, oracle, pairs] if is_sft else [model, sft, oracle, pairs]

    def body(path: Path) -> StageOutput:
        from madpo.modeling import load_causal_lm, load_tokenizer
        from madpo.pipeline.evaluate import evaluate_policy, log_to_tensorboard, write_results

        prompts = [r["prompt"] for r in read_jsonl(pairs.output("eval_prompts"))][:n_prompts]
        if not prompts:
            raise ValueError("no evaluation prompts")
        model_path = model.output("model")
        tok = load_tokenizer(model_path)
        policy = load_causal_lm(model_path, pad_token_id=tok.pad_token_id).to(ctx.device)
        reference = None if is_sft else load_causal_lm(sft.output("model"), pad_token_id=tok.pad_token_id)
        if reference is not None:
            reference = reference.to(ctx.device)
        results = evaluate_policy(
            policy,
            reference,
            tok,
            load_oracle(oracle, oracle_cfg, ctx.device),
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            n_examples=cfg.n_examples,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            device=ctx.device,
            progress=ctx.trainer.progress_bar,
        )
        if is_sft:
            results["kl"] = {"n": len(prompts), "mean": 0.0, "se": 0.0, "sd": 0.0, "note": "the reference itself"}
        results["model"] = model.label
        results["model_path"] = model_path
        results["oracle_snippet_accuracy"] = oracle.stats.get("snippet_accuracy")
        write_results(results, path)
        log_to_tensorboard(results, path / "tensorboard")
        r = results["reward"]
        say(
            f"{label}: mean oracle reward {r['mean']:.3f} ± {r['se']:.3f} (SE), 95 % CI "
            f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}], KL {results['kl']['mean']:.2f} nats, n={r['n']}"
        )
        return StageOutput({"results": "results.json", "results_md": "results.md"}, results)

    return run_stage(ctx, "evaluate", config, upstream, body, label=label)


# ------------------------------------------------------------------------------------------------------------------
# The whole pipeline
# ------------------------------------------------------------------------------------------------------------------


class Pipeline:
    """The stages wired together for one `PipelineConfig`; each accessor runs (or finds cached) its stage once per
    instance. `bench/reproduce.py` calls `policy()` / `evaluate_policy()` with other `PolicyConfig`s on the same
    upstream stages."""

    def __init__(self, cfg: PipelineConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.ctx = Context(Path(cfg.output_dir), cfg.trainer)
        self.ctx.output_dir.mkdir(parents=True, exist_ok=True)
        self._memo: dict[str, StageResult] = {}

    def _once(self, key: str, make: Callable[[], StageResult]) -> StageResult:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def lengths(self) -> tuple[int, int]:
        return self.cfg.max_prompt_length, self.cfg.pair_max_length

    @property
    def snippet_tokens(self) -> int:
        return self.cfg.oracle.snippet_tokens or self.cfg.data.prompt_tokens + self.cfg.pairs.max_new_tokens

    def reviews(self) -> StageResult:
        return self._once("reviews", lambda: stage_reviews(self.ctx, self.cfg.data))

    def tokenizer(self) -> StageResult:
        return self._once("tokenizer", lambda: stage_tokenizer(self.ctx, self.cfg.base_model, self.reviews()))

    def oracle(self) -> StageResult:
        return self._once(
            "oracle",
            lambda: stage_oracle(self.ctx, self.cfg.oracle, self.snippet_tokens, self.reviews(), self.tokenizer()),
        )

    def base_model(self) -> StageResult:
        return self._once(
            "base_model", lambda: stage_base_model(self.ctx, self.cfg.base_model, self.reviews(), self.tokenizer())
        )

    def sft(self) -> StageResult:
        return self._once(
            "sft",
            lambda: stage_sft(self.ctx, self.cfg.sft, self.cfg.data.prompt_tokens, self.reviews(), self.base_model()),
        )

    def pairs(self) -> StageResult:
        return self._once(
            "pairs",
            lambda: stage_pairs(
                self.ctx,
                self.cfg.pairs,
                self.cfg.data.prompt_tokens,
                self.cfg.oracle,
                self.reviews(),
                self.oracle(),
                self.sft(),
            ),
        )

    def reward(self, tier: str) -> StageResult:
        return self._once(
            f"reward-{tier}",
            lambda: stage_reward(self.ctx, self.cfg.reward, tier, self.lengths, self.base_model(), self.pairs()),
        )

    def train_margins(self, tier: str) -> np.ndarray:
        """The tier's reward-model rm_margin = r(chosen) − r(rejected) on its training pairs, tokenized as the
        policy stage tokenizes them and scored into the same cache (float32 on the CPU, not under a Trainer)."""
        from madpo.modeling import load_tokenizer

        tok = load_tokenizer(self.sft().output("model"))
        train, _, _, _ = _pair_data(self.pairs(), tier, 0, tok, self.lengths[0])
        scored, _ = score_rm_margins(
            self.ctx, self.reward(tier), tok, {"train": train}, self.lengths, under_trainer=False
        )
        return np.asarray(scored["train"]["rm_margin"], dtype=np.float64)

    def policy(self, cfg: PolicyConfig | None = None) -> StageResult:
        cfg = cfg or self.cfg.policy

        def make() -> StageResult:
            reward = self.reward(cfg.tier) if cfg.uses_margins else None
            return stage_policy(self.ctx, cfg, self.lengths, self.sft(), self.pairs(), reward)

        return self._once(f"policy:{cfg!r}", make)

    def evaluate_model(self, model: StageResult) -> StageResult:
        return stage_evaluate(
            self.ctx,
            self.cfg.evaluate,
            self.cfg.n_eval_prompts,
            self.cfg.oracle,
            model,
            self.sft(),
            self.oracle(),
            self.pairs(),
        )

    def evaluate_sft(self) -> StageResult:
        return self._once("evaluate-sft", lambda: self.evaluate_model(self.sft()))

    def evaluate_policy(self, cfg: PolicyConfig | None = None) -> StageResult:
        model = self.policy(cfg)
        return self._once(f"evaluate:{model.path}", lambda: self.evaluate_model(model))

    def run(self) -> dict[str, StageResult]:
        """Every stage in order (up to `stop_after`); returns the results by stage name."""
        stop = self.cfg.stop_after
        steps: list[tuple[str, Callable[[], StageResult]]] = [
            ("reviews", self.reviews),
            ("tokenizer", self.tokenizer),
            ("oracle", self.oracle),
            ("base_model", self.base_model),
            ("sft", self.sft),
            ("pairs", self.pairs),
        ]
        if self.cfg.policy.uses_margins:
            steps.append(("reward", lambda: self.reward(self.cfg.policy.tier)))
        steps += [("policy", self.policy), ("evaluate_sft", self.evaluate_sft), ("evaluate", self.evaluate_policy)]
        if stop == "reward" and not self.cfg.policy.uses_margins:
            stop = "pairs"  # this method reads no reward model
        done: dict[str, StageResult] = {}
        for name, make in steps:
            done[name] = make()
            if stop is not None and name == stop:
                break
        return done


__all__ = [
    "Context",
    "MANIFEST",
    "PIPELINE_VERSION",
    "Pipeline",
    "StageError",
    "StageOutput",
    "StageResult",
    "check_prompt_lengths",
    "fit",
    "load_oracle",
    "load_pairs",
    "load_reviews",
    "load_slices",
    "margin_stats",
    "policy_label",
    "quiet_libraries",
    "run_stage",
    "stage_base_model",
    "stage_evaluate",
    "stage_key",
    "stage_oracle",
    "stage_pairs",
    "stage_policy",
    "stage_reviews",
    "stage_reward",
    "stage_sft",
    "stage_tokenizer",
    "write_json_atomic",
]
