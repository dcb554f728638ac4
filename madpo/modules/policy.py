"""PolicyLightningModule: one causal LM trained with a `PreferenceLoss` (SFT, DPO, IPO, β-DPO, MADPO or any
subclass), one concatenated forward per step."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from madpo.data.requirements import DataRequirements
from madpo.errors import UserError
from madpo.losses import (
    LogProbs,
    LossContext,
    MADPOLoss,
    PreferenceLoss,
    build_loss,
    class_path,
    loss_config,
    weighted,
)
from madpo.modeling import is_adapter_tensor, load_causal_lm, load_tokenizer, sequence_logps, state_fingerprint
from madpo.modules.base import LoraOptions, OptimizerOptions, PairwiseModule
from madpo.predict import GenerationOptions, PredictionModels, load_prediction_models, predict_batch
from madpo.sharding import uses_fully_shard


class PolicyLightningModule(PairwiseModule):
    """A causal-LM policy trained with `loss`, a `madpo.losses.PreferenceLoss`.

    Each step runs the policy once on the stacked batch (chosen rows then rejected rows) and hands the summed
    completion log-probs to the loss; the reference log-probs come precomputed from the DataModule (default: the
    reference model is never in memory while training) or from a frozen copy kept outside the checkpoint
    (`reference: online`). With LoRA the reference is the same model with its adapter disabled. A `weight` column of
    the data (finite, >= 0) multiplies each pair's loss, whatever the loss (docs/method.md eq. (30)), logged as
    `weight/mean`.

    Args:
        model_name_or_path: Hub id or local directory of the initial policy (also the reference and the tokenizer).
        loss: The objective and its options, by class_path: madpo.losses.SFTLoss, DPOLoss, IPOLoss, BetaDPOLoss,
            MADPOLoss (the default, with its defaults) or any PreferenceLoss subclass.
        reference: 'precomputed' (DataModule scores the reference once, cached) or 'online' (frozen copy per step).
        optimizer: AdamW and schedule options.
        lora: LoRA adapter options (null: full fine-tuning).
        dtype: Weights dtype to load (float32, bfloat16, float16) or null for the checkpoint's default.
        gradient_checkpointing: Trade compute for activation memory.
        disable_dropout: Turn dropout off in the policy (as TRL does), so implicit rewards are deterministic.
        fast_logps: Apply the LM head only at completion positions (False: plain full-logits path).
        chunked_head: With a frozen head (LoRA) and more than `madpo.modeling.GRAD_CHUNK_ELEMENTS` completion logits,
            compute them in chunks, never holding positions x vocabulary (False: all at once; faster, more memory).
        on_nonfinite_loss: A non-finite training loss raises (naming step, batch and pair rows) or, with 'skip',
            skips that optimiser step on every rank and counts it (train/nonfinite_steps_skipped).
        export: Write the trained policy as a transformers directory at the end of fit.
        export_dir: Where to export (default: <log_dir>/hf_model).
        trust_remote_code: Allow custom modelling code from the checkpoint (off unless you ask).
        generation: How `predict` samples completions (max_new_tokens, temperature, top_k, top_p, seed).
    """

    def __init__(
        self,
        model_name_or_path: str,
        loss: PreferenceLoss | None = None,
        reference: Literal["precomputed", "online"] = "precomputed",
        optimizer: OptimizerOptions | None = None,
        lora: LoraOptions | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        fast_logps: bool = True,
        chunked_head: bool = True,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
        export: bool = True,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        generation: GenerationOptions = GenerationOptions(),  # noqa: B008 - frozen, so one shared default is safe
    ) -> None:
        if reference not in ("precomputed", "online"):
            raise ValueError(f"reference must be 'precomputed' or 'online', got {reference!r}")
        # a checkpoint's hparams hold the loss as {class_path, init_args} (see below); None is MADPO's defaults
        loss = MADPOLoss() if loss is None else build_loss(loss)
        if not isinstance(loss, PreferenceLoss):
            raise TypeError(f"loss must be a madpo.losses.PreferenceLoss, got {type(loss).__name__}")
        self.metric_names = tuple(loss.metric_names)
        if loss.data_requirements().pairs and "weight/mean" not in self.metric_names:
            self.metric_names += ("weight/mean",)  # logged when the data has a `weight` column
        super().__init__()
        # The loss is an nn.Module: in hparams it is its class path and options, plain data that a checkpoint loads
        # with weights_only=True and that `load_from_checkpoint` and LightningCLI's --ckpt_path rebuild it from.
        self.save_hyperparameters(ignore=["loss"])
        self.hparams["loss"] = loss_config(loss)
        self.loss = loss
        self.optimizer_options = optimizer or OptimizerOptions()
        # Sampling is chosen when predict runs: kept out of the checkpoint's hyper_parameters, which LightningCLI
        # would otherwise apply over the command line's generation options under --ckpt_path.
        self.generation = generation
        self.hparams.pop("generation", None)
        tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(
            model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, pad_token_id=tokenizer.pad_token_id
        )
        self.lora = lora
        if lora is not None:
            self.model = _apply_lora(self.model, lora, task_type="CAUSAL_LM")
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if disable_dropout:
            _disable_dropout(self.model)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        # The reference is the initial policy. A fresh adapter starts at zero (LoRA B = 0), so the base model with
        # its adapter disabled is the initial policy and needs no copy; a loaded adapter that goes on training is
        # part of the initial policy, so then the reference is a frozen merged copy, as for full fine-tuning.
        self._reference_disables_adapter = lora is not None and not (
            lora.adapter_path and not lora.freeze_loaded_adapter
        )
        # The frozen reference for `reference: online` lives outside the module tree: never in a checkpoint, never
        # in DDP's parameter sync, never touched by the optimiser.
        self._online_reference: list[nn.Module] = []

    # ---- data handshake -----------------------------------------------------------------------------------------
    def data_requirements(self) -> DataRequirements:
        """The loss's requirements; with an online reference the DataModule scores no reference log-probs."""
        req = self.loss.data_requirements()
        return dataclasses.replace(req, reference_logps=req.reference_logps and self.hparams.reference == "precomputed")

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The frozen reference π_ref, in eval mode on the training device: the initial policy.

        Called by the DataModule during setup, before any training step and before a checkpoint is restored, so the
        weights are the initial ones. With LoRA it is the same model with the adapter disabled (no copy).
        """
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if self._reference_disables_adapter:
            was_training = self.model.training
            self.model.to(device).eval()
            try:
                with self.model.disable_adapter():
                    yield self.model
            finally:
                self.model.train(was_training)
        else:
            ref = self._frozen_copy().to(device)
            try:
                yield ref
            finally:
                del ref

    def reference_fingerprint(self, reference: nn.Module) -> str:
        """Cache key of the reference's weights: without the adapter's own (randomly initialised, disabled) tensors
        when the reference is the adapter-disabled base, so runs that differ only in the adapter's seed share it."""
        return state_fingerprint(reference, skip=is_adapter_tensor if self._reference_disables_adapter else None)

    def _frozen_copy(self) -> nn.Module:
        model = copy.deepcopy(self.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        return model.eval().requires_grad_(False)

    def setup(self, stage: str) -> None:
        uses_reference = self.loss.data_requirements().reference_logps
        if uses_reference and self.hparams.reference == "online" and not self._reference_disables_adapter:
            if not self._online_reference:
                self._online_reference.append(self._frozen_copy())

    def _frozen_modules(self) -> dict[str, nn.Module]:
        """The frozen `reference: online` copy, sharded beside the policy so that no rank holds a whole model beside
        its shards (forward-only: gathered layer by layer, never reduced)."""
        return {"reference": self._online_reference[0]} if self._online_reference else {}

    def _online_reference_model(self) -> nn.Module:
        """The frozen copy, on the policy's device whichever loop (fit, validate, test, predict) runs."""
        ref = self._online_reference[0]
        if next(ref.parameters()).device != self.device:
            ref.to(self.device)
        return ref

    # ---- gradient accumulation: statistics of the whole optimiser step -------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        self._train_batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def _accumulating(self, stage: str) -> int:
        """The number of micro-batches per optimiser step when it is > 1 on a training step, else 0."""
        if stage != "train" or self._trainer is None:
            return 0
        k = int(self.trainer.accumulate_grad_batches)
        return k if k > 1 else 0

    def _optimizer_step_batch(self, accumulate: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the current optimiser step (all its micro-batches), from the DataModule, which knows
        the epoch's order."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "optimizer_step_batch"):
            raise ValueError(
                f"{class_path(self.loss)} with accumulate_grad_batches > 1 needs PreferenceDataModule, whose "
                "loader knows which rows share an optimiser step"
            )
        n_batches = int(self.trainer.num_training_batches)
        return datamodule.optimizer_step_batch(self._train_batch_idx, accumulate, n_batches)

    def _step_logps(self, accumulate: int, size: int) -> tuple[torch.Tensor, LogProbs, tuple[torch.Tensor, ...]]:
        """(row index, policy log-probs, reference log-probs) of this rank's pairs of the whole optimiser step,
        without gradient, scored in chunks of `size` pairs (the micro-batch size)."""
        rows = self._optimizer_step_batch(accumulate)
        chosen, rejected, ref_chosen, ref_rejected = [], [], [], []
        with torch.no_grad():
            for start in range(0, rows["index"].numel(), size):
                chunk = _pair_slice(rows, start, start + size, self.device)
                n = chunk["index"].numel()
                logps, _ = self._logps(self.model, chunk, slice(None))
                ref = self._reference_logps(chunk, n)
                chosen.append(logps[:n])
                rejected.append(logps[n:])
                ref_chosen.append(ref[0])
                ref_rejected.append(ref[1])
        counts = torch.zeros(0)  # the step-level selection reads log-probs only
        policy = LogProbs(torch.cat(chosen), counts, torch.cat(rejected), counts)
        return rows["index"].to(self.device), policy, (torch.cat(ref_chosen), torch.cat(ref_rejected))

    def _loss_context(self, stage: str, n_pairs: int) -> LossContext:
        accumulate = self._accumulating(stage)
        ctx = LossContext(
            stage=stage,
            world_size=self.world_size,
            rank=self.global_rank,
            gather=self.gather_pairs,
            global_sum=self.global_sum,
        )
        if accumulate:
            ctx.accumulate = accumulate
            ctx.step_key = (self.current_epoch, self._train_batch_idx // accumulate)
            ctx.step_rows = lambda: self._optimizer_step_batch(accumulate)
            ctx.step_logps = lambda: self._step_logps(accumulate, n_pairs)
        return ctx

    # ---- the step -----------------------------------------------------------------------------------------------
    def _logps(
        self, model: nn.Module, batch: dict[str, torch.Tensor], rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(
            model,
            batch["input_ids"][rows],
            batch["attention_mask"][rows],
            batch["completion_mask"][rows],
            fast=self.hparams.fast_logps,
            chunk_elements=None if self.hparams.get("chunked_head", True) else 0,
        )

    def _reference_logps(self, batch: dict[str, torch.Tensor], n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        if self.hparams.reference == "precomputed":
            raise ValueError(
                "reference='precomputed' but the batch has no ref_chosen_logps/ref_rejected_logps: attach "
                "PreferenceDataModule to the Trainer (it precomputes them), or use reference='online'"
            )
        with torch.no_grad():
            if self._reference_disables_adapter:
                with self.model.disable_adapter():
                    logps, _ = self._logps(self.model, batch, slice(None))
            else:
                logps, _ = self._logps(self._online_reference_model(), batch, slice(None))
        return logps[:n_pairs], logps[n_pairs:]

    def compute(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        n_pairs = batch["index"].numel()
        needs = self.loss.data_requirements()
        if not needs.pairs:  # single completions (a pair batch gives its chosen rows)
            logps, n_tokens = self._logps(self.model, batch, slice(0, n_pairs))
            policy, reference = LogProbs(logps, n_tokens), None
        else:
            if batch["input_ids"].shape[0] != 2 * n_pairs:
                raise ValueError(f"{class_path(self.loss)} needs preference pairs; the batch holds single completions")
            logps, n_tokens = self._logps(self.model, batch, slice(None))  # one forward over [chosen; rejected]
            policy = LogProbs(logps[:n_pairs], n_tokens[:n_pairs], logps[n_pairs:], n_tokens[n_pairs:])
            reference = self._reference_logps(batch, n_pairs) if needs.reference_logps else None
        out = self.loss(policy, reference, batch, self._loss_context(stage, n_pairs))
        losses, metrics = out.losses, dict(out.metrics)
        if needs.pairs and "weight" in batch:  # eq. (30), after any weight of the loss's own (MADPO's w): both multiply
            if out.loss is not None:
                raise ValueError(
                    f"the data has a 'weight' column, but {class_path(self.loss)} returns its own reduced loss here "
                    "(e.g. beta-DPO under gradient accumulation), which per-pair weights cannot multiply; drop the "
                    "column or the accumulation"
                )
            losses = weighted(losses, batch["weight"])
            metrics["weight/mean"] = batch["weight"]
        loss = losses.mean() if out.loss is None else out.loss
        return loss, {**metrics, "loss": losses}, dict(out.scalars)

    def on_train_epoch_end(self) -> None:
        """Histograms of the training margins and of what the loss makes of them (TensorBoard)."""
        dataset = getattr(self.trainer.datamodule, "train_dataset", None) if self.trainer.datamodule else None
        experiment = getattr(self.logger, "experiment", None)
        if dataset is None or "rm_margin" not in dataset.column_names or not hasattr(experiment, "add_histogram"):
            return
        if not self.trainer.is_global_zero:
            return
        margins = torch.tensor(dataset["rm_margin"], dtype=torch.float32)
        experiment.add_histogram("rm/margin", margins, self.global_step)
        for name, values in self.loss.epoch_histograms(margins).items():
            experiment.add_histogram(name, values, self.global_step)

    # ---- predict: sample a completion per prompt (madpo.predict; PredictionWriter writes the rows) ----------------
    def on_predict_start(self) -> None:
        if uses_fully_shard(self._trainer):
            # each rank's generation runs its own number of forwards, and every sharded forward is a collective
            raise UserError(
                "predict does not run sharded (ranks would wait on each other's generation steps): export the model "
                "(`python cli.py export --ckpt ...`) and predict from the export on one device or with DDP"
            )
        # after the checkpoint restore: the reference is loaded from model_name_or_path, not copied from the policy
        self._prediction_models: PredictionModels | None = load_prediction_models(self)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """One completion per prompt of the batch, with its policy and reference log-probs (and reward)."""
        models = getattr(self, "_prediction_models", None) or load_prediction_models(self)
        self._prediction_models = models
        return predict_batch(self.model, batch, models, self.generation, fast_logps=self.hparams.fast_logps)

    def on_predict_end(self) -> None:
        self._prediction_models = None  # frees the reference and reward model


def _pair_slice(batch: dict[str, torch.Tensor], start: int, stop: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pairs [start, stop) of a collated preference batch (chosen rows, then rejected rows), on `device`."""
    n = batch["index"].numel()
    stop = min(stop, n)
    rows = torch.cat([torch.arange(start, stop), torch.arange(n + start, n + stop)])
    out = {}
    for name, value in batch.items():
        value = value[rows] if value.shape[0] == 2 * n else value[start:stop]
        out[name] = value.to(device)
    width = int(out["attention_mask"].sum(1).max())  # drop the padding the rest of the step needed
    for name in ("input_ids", "attention_mask", "completion_mask"):
        out[name] = out[name][:, :width]
    return out


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def _apply_lora(
    model: nn.Module, lora: LoraOptions, *, task_type: str, modules_to_save: list[str] | None = None
) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora.adapter_path:
        model = PeftModel.from_pretrained(model, lora.adapter_path, is_trainable=not lora.freeze_loaded_adapter)
        if not lora.freeze_loaded_adapter:
            return model
        # the paper: merge the frozen SFT adapter into the base, then train a fresh adapter on top
        model = model.merge_and_unload()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        modules_to_save=modules_to_save,
        bias="none",
    )
    return get_peft_model(model, config)
