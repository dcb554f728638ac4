"""PolicyLightningModule: SFT, DPO, IPO, β-DPO and MADPO on one causal LM, one concatenated forward per step."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from madpo import losses as L
from madpo.data.requirements import DataRequirements
from madpo.modeling import is_adapter_tensor, load_causal_lm, load_tokenizer, sequence_logps, state_fingerprint
from madpo.modules.base import LoraOptions, OptimizerOptions, PairwiseModule
from madpo.predict import GenerationOptions, PredictionModels, load_prediction_models, predict_batch

LossName = Literal["sft", "dpo", "ipo", "beta_dpo", "madpo"]

_PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class PolicyLightningModule(PairwiseModule):
    """A causal-LM policy trained with `loss` in sft | dpo | ipo | beta_dpo | madpo.

    Each step runs the policy once on the stacked batch (chosen rows then rejected rows) and reads summed completion
    log-probs; the reference log-probs come precomputed from the DataModule (default: the reference model is never in
    memory while training) or from a frozen copy kept outside the checkpoint (`reference: online`). With LoRA the
    reference is the same model with its adapter disabled.

    Args:
        model_name_or_path: Hub id or local directory of the initial policy (also the reference and the tokenizer).
        loss: Which objective: sft (token-mean NLL on chosen/completion), dpo, ipo, beta_dpo or madpo.
        beta: DPO temperature β (IPO's τ; β-DPO's β0).
        c_max: MADPO amplification intensity c_max (the paper's headline 4; its notebook 2).
        c_min: MADPO floor of c; null means 1/c_max.
        lam: MADPO steepness λ.
        tau: MADPO margin threshold τ on the reward model's logit scale (ln 999 ≈ 6.9068).
        variant: MADPO weight variant: full, amp_only, reg_only (method.md §2.7); no_downweight (w clipped to ≥ 1),
            no_amplify (w clipped to ≤ 1).
        normalize_weights: Divide MADPO weights by their global batch mean (not in the paper; default off).
        ipo_length_normalize: IPO on length-normalised log-probs (TRL's form) instead of summed (the paper's form).
        beta_dpo_alpha: β-DPO α (β_batch = β0·(1 + α·(mean kept gap − μ))).
        beta_dpo_rho: β-DPO fraction ρ of pairs filtered out per global batch.
        beta_dpo_momentum: β-DPO EMA momentum γ.
        reference: 'precomputed' (DataModule scores the reference once, cached) or 'online' (frozen copy per step).
        optimizer: AdamW and schedule options.
        lora: LoRA adapter options (null: full fine-tuning).
        dtype: Weights dtype to load (float32, bfloat16, float16) or null for the checkpoint's default.
        gradient_checkpointing: Trade compute for activation memory.
        disable_dropout: Turn dropout off in the policy (as TRL does), so implicit rewards are deterministic.
        fast_logps: Apply the LM head only at completion positions (False: plain full-logits path).
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
        loss: LossName = "madpo",
        beta: float = 0.1,
        c_max: float = 4.0,
        c_min: float | None = None,
        lam: float = 1.0,
        tau: float = math.log(999.0),
        variant: Literal["full", "amp_only", "reg_only", "no_downweight", "no_amplify"] = "full",
        normalize_weights: bool = False,
        ipo_length_normalize: bool = False,
        beta_dpo_alpha: float = 0.6,
        beta_dpo_rho: float = 0.2,
        beta_dpo_momentum: float = 0.9,
        reference: Literal["precomputed", "online"] = "precomputed",
        optimizer: OptimizerOptions | None = None,
        lora: LoraOptions | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        fast_logps: bool = True,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
        export: bool = True,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        generation: GenerationOptions = GenerationOptions(),  # noqa: B008 - frozen, so one shared default is safe
    ) -> None:
        if loss not in ("sft", "dpo", "ipo", "beta_dpo", "madpo"):
            raise ValueError(f"loss must be one of sft, dpo, ipo, beta_dpo, madpo; got {loss!r}")
        if reference not in ("precomputed", "online"):
            raise ValueError(f"reference must be 'precomputed' or 'online', got {reference!r}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.metric_names = self._metrics_for(loss)
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_options = optimizer or OptimizerOptions()
        # Sampling is chosen when predict runs: kept out of the checkpoint's hyper_parameters, which LightningCLI
        # would otherwise apply over the command line's generation options under --ckpt_path.
        self.generation = generation
        self.hparams.pop("generation", None)
        if loss == "madpo":  # validate the weight options now, not at the first step
            L.madpo_weights(torch.zeros(1), c_max=c_max, c_min=c_min, lam=lam, tau=tau, variant=variant)
        self.beta_dpo = (
            L.BetaDPO(beta=beta, alpha=beta_dpo_alpha, rho=beta_dpo_rho, momentum=beta_dpo_momentum)
            if loss == "beta_dpo"
            else None
        )
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

    @staticmethod
    def _metrics_for(loss: str) -> tuple[str, ...]:
        if loss == "sft":
            return ("loss", "logps/chosen", "nll_per_token")
        extra = {
            "madpo": ("madpo/weight_mean", "madpo/weight_min", "madpo/weight_max", "rm/margin_mean"),
            "beta_dpo": ("beta_dpo/kept",),
        }.get(loss, ())
        return _PAIR_METRICS + extra

    # ---- data handshake -----------------------------------------------------------------------------------------
    def data_requirements(self) -> DataRequirements:
        loss = self.hparams.loss
        return DataRequirements(
            pairs=loss != "sft",
            reference_logps=loss != "sft" and self.hparams.reference == "precomputed",
            rm_margin=loss == "madpo",
        )

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
        if self.hparams.loss != "sft" and self.hparams.reference == "online" and not self._reference_disables_adapter:
            if not self._online_reference:
                self._online_reference.append(self._frozen_copy())

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

    def _optimizer_step_batch(self, accumulate: int) -> tuple[tuple[int, int], dict[str, torch.Tensor]]:
        """(key, batch) of this rank's rows of the current optimiser step (all its micro-batches), from the
        DataModule, which knows the epoch's order."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "optimizer_step_batch"):
            raise ValueError(
                f"loss={self.hparams.loss} with accumulate_grad_batches > 1 needs PreferenceDataModule, whose "
                "loader knows which rows share an optimiser step"
            )
        key = (self.current_epoch, self._train_batch_idx // accumulate)
        n_batches = int(self.trainer.num_training_batches)
        return key, datamodule.optimizer_step_batch(self._train_batch_idx, accumulate, n_batches)

    def _step_token_count(self, accumulate: int, n_rows: int, index: torch.Tensor) -> torch.Tensor:
        """Completion tokens of the whole optimiser step on every rank (SFT's normaliser), once per step."""
        key, rows = self._optimizer_step_batch(accumulate)
        if getattr(self, "_step_tokens", (None,))[0] != key:
            n_step_rows = rows["index"].numel()
            if not torch.isin(index.cpu(), rows["index"]).all():
                raise RuntimeError("micro-batch rows are not in their optimiser step: the loader's order changed")
            local = rows["completion_mask"][:n_step_rows, 1:].sum().float().to(self.device)
            self._step_tokens = (key, self.global_sum(local))
        return self._step_tokens[1]

    def _step_selection(self, accumulate: int, index: torch.Tensor) -> tuple[dict[int, bool], L.BetaDPOSelection]:
        """β-DPO's EMA update, kept-pair mask and β_batch over the whole optimiser step (all micro-batches, all
        ranks), as the method defines them: the policy's gaps on the step's rows, without gradient, once per step."""
        key, rows = self._optimizer_step_batch(accumulate)
        if getattr(self, "_selection", (None,))[0] != key:
            assert self.beta_dpo is not None
            gaps = []
            size = index.numel()
            with torch.no_grad():
                for start in range(0, rows["index"].numel(), size):
                    chunk = _pair_slice(rows, start, start + size, self.device)
                    n = chunk["index"].numel()
                    logps, _ = self._logps(self.model, chunk, slice(None))
                    ref_chosen, ref_rejected = self._reference_logps(chunk, n)
                    gaps.append(L.implicit_margin(logps[:n], logps[n:], ref_chosen, ref_rejected))
            step_index = rows["index"].to(self.device)
            selection = self.beta_dpo.select(
                torch.cat(gaps), all_gather=self.gather_pairs, rank=self.global_rank, order_key=step_index
            )
            kept = dict(zip(step_index.tolist(), selection.mask.tolist(), strict=True))
            self._selection = (key, kept, selection)
        _, kept, selection = self._selection
        if any(i not in kept for i in index.tolist()):
            raise RuntimeError("micro-batch rows are not in their optimiser step: the loader's order changed")
        return kept, selection

    def _beta_dpo_accumulated(
        self, args: tuple[torch.Tensor, ...], index: torch.Tensor, accumulate: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, L.BetaDPOSelection]:
        """(loss to return, per-pair losses, mask, selection) for one micro-batch. Lightning divides each returned
        loss by `accumulate` and DDP averages over ranks, so the returned sum carries world * accumulate / N_kept:
        the optimiser then sees the mean of -log σ(β_batch h) over the step's kept pairs."""
        kept, selection = self._step_selection(accumulate, index)
        h = L.implicit_margin(*args)
        mask = torch.tensor([kept[i] for i in index.tolist()], device=h.device)
        per_pair = -torch.nn.functional.logsigmoid(selection.beta.to(h.device, h.dtype) * h)
        masked = torch.where(mask, per_pair, torch.zeros_like(per_pair))
        loss = masked.sum() * (self.world_size * accumulate / selection.n_kept)
        return loss, masked * (selection.n / selection.n_kept), mask, selection

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
        if self.hparams.loss == "sft":
            return self._sft(batch, n_pairs, stage)
        if batch["input_ids"].shape[0] != 2 * n_pairs:
            raise ValueError(f"loss={self.hparams.loss} needs preference pairs; the batch holds single completions")
        logps, n_tokens = self._logps(self.model, batch, slice(None))  # one forward over [chosen; rejected]
        policy_chosen, policy_rejected = logps[:n_pairs], logps[n_pairs:]
        ref_chosen, ref_rejected = self._reference_logps(batch, n_pairs)
        args = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        beta = self.hparams.beta
        per_pair: dict[str, torch.Tensor] = {}
        scalars: dict[str, torch.Tensor] = {}
        loss_name = self.hparams.loss
        if loss_name == "dpo":
            losses = L.dpo_losses(*args, beta=beta)
        elif loss_name == "ipo":
            if self.hparams.ipo_length_normalize:
                count_chosen, count_rejected = n_tokens[:n_pairs].float(), n_tokens[n_pairs:].float()
                args = (
                    policy_chosen / count_chosen,
                    policy_rejected / count_rejected,
                    ref_chosen / count_chosen,
                    ref_rejected / count_rejected,
                )
            losses = L.ipo_losses(*args, beta=beta)
        elif loss_name == "madpo":
            if "rm_margin" not in batch:
                raise ValueError(
                    "loss=madpo needs rm_margin in the batch: pass --data.reward_model or an rm_margin column"
                )
            margins = batch["rm_margin"].float()
            losses, weights = L.madpo_losses_and_weights(*args, margins, beta=beta, **self._weight_options())
            if self.hparams.normalize_weights:  # Σ w·ℓ / Σ w over the global batch instead of the paper's mean
                scale = self.gather_pairs(weights).mean().clamp_min(1e-12)
                losses, weights = losses / scale, weights / scale
            per_pair.update(
                {
                    "madpo/weight_mean": weights,
                    "madpo/weight_min": weights,
                    "madpo/weight_max": weights,
                    "rm/margin_mean": margins,
                }
            )
        else:  # beta_dpo
            assert self.beta_dpo is not None
            self.beta_dpo.train(stage == "train")  # the EMA updates only on training steps
            accumulate = self._accumulating(stage)
            if accumulate:
                loss, losses, mask, sel = self._beta_dpo_accumulated(args, batch["index"], accumulate)
                beta_t, gap_mean, gap_std = (
                    x.to(losses.device, losses.dtype) for x in (sel.beta, sel.gap_mean, sel.gap_std)
                )
            else:
                out = self.beta_dpo(
                    *args, all_gather=self.gather_pairs, rank=self.global_rank, order_key=batch["index"]
                )
                losses, mask, beta_t, gap_mean, gap_std = out.losses, out.mask, out.beta, out.gap_mean, out.gap_std
            per_pair["beta_dpo/kept"] = mask.float()
            scalars.update({"beta/effective": beta_t, "beta_dpo/gap_mean": gap_mean, "beta_dpo/gap_std": gap_std})
        chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
        rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
        per_pair.update(
            {
                "loss": losses,
                "rewards/chosen": chosen_rewards,
                "rewards/rejected": rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "rewards/margins": chosen_rewards - rejected_rewards,
                "logps/chosen": policy_chosen.detach(),
                "logps/rejected": policy_rejected.detach(),
            }
        )
        if loss_name == "beta_dpo" and self._accumulating(stage):
            return loss, per_pair, scalars
        return losses.mean(), per_pair, scalars

    def on_train_epoch_end(self) -> None:
        """Histograms of the training margins and of the MADPO weights they give (TensorBoard)."""
        dataset = getattr(self.trainer.datamodule, "train_dataset", None) if self.trainer.datamodule else None
        experiment = getattr(self.logger, "experiment", None)
        if dataset is None or "rm_margin" not in dataset.column_names or not hasattr(experiment, "add_histogram"):
            return
        if not self.trainer.is_global_zero:
            return
        margins = torch.tensor(dataset["rm_margin"], dtype=torch.float32)
        experiment.add_histogram("rm/margin", margins, self.global_step)
        if self.hparams.loss == "madpo":
            experiment.add_histogram(
                "madpo/weight", L.madpo_weights(margins, **self._weight_options()), self.global_step
            )

    def _weight_options(self) -> dict:
        h = self.hparams
        return {"c_max": h.c_max, "c_min": h.c_min, "lam": h.lam, "tau": h.tau, "variant": h.variant}

    def _sft(
        self, batch: dict[str, torch.Tensor], n_rows: int, stage: str = "val"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Token-mean NLL of the completion (chosen) tokens over the optimiser step on every rank: Σ −log p / N."""
        logps, n_tokens = self._logps(self.model, batch, slice(0, n_rows))
        # DDP averages gradients over ranks and Lightning divides each micro-batch's loss by `accumulate`: divide by
        # N / (world * accumulate), N the tokens of the whole optimiser step, so the update follows the token mean.
        accumulate = self._accumulating(stage)
        if accumulate:
            step_tokens = self._step_token_count(accumulate, n_rows, batch["index"])
        else:
            accumulate, step_tokens = 1, self.global_sum(n_tokens.sum().float())
        loss = -logps.sum() / (step_tokens / (self.world_size * accumulate)).clamp_min(1.0)
        per_pair = {
            "loss": -logps.detach() / n_tokens.clamp_min(1),
            "logps/chosen": logps.detach(),
            "nll_per_token": -logps.detach() / n_tokens.clamp_min(1),
        }
        return loss, per_pair, {}

    # ---- predict: sample a completion per prompt (madpo.predict; PredictionWriter writes the rows) ----------------
    def on_predict_start(self) -> None:
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
