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
from madpo.modeling import load_causal_lm, load_tokenizer, sequence_logps
from madpo.modules.base import LoraOptions, OptimizerOptions, PairwiseModule

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
        if self.lora is not None:
            was_training = self.model.training
            self.model.to(device).eval()
            try:
                with self.model.disable_adapter():
                    yield self.model
            finally:
                self.model.train(was_training)
        else:
            ref = copy.deepcopy(self.model).to(device).eval().requires_grad_(False)
            try:
                yield ref
            finally:
                del ref

    def setup(self, stage: str) -> None:
        if self.hparams.loss != "sft" and self.hparams.reference == "online" and self.lora is None:
            if not self._online_reference:
                self._online_reference.append(copy.deepcopy(self.model).eval().requires_grad_(False))

    def on_fit_start(self) -> None:
        for ref in self._online_reference:
            ref.to(self.device)

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
            if self.lora is not None:
                with self.model.disable_adapter():
                    logps, _ = self._logps(self.model, batch, slice(None))
            else:
                logps, _ = self._logps(self._online_reference[0], batch, slice(None))
        return logps[:n_pairs], logps[n_pairs:]

    def compute(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        n_pairs = batch["index"].numel()
        if self.hparams.loss == "sft":
            return self._sft(batch, n_pairs)
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
            out = self.beta_dpo(*args, all_gather=self.gather_pairs, rank=self.global_rank, order_key=batch["index"])
            losses = out.losses
            per_pair["beta_dpo/kept"] = out.mask.float()
            scalars.update(
                {"beta/effective": out.beta, "beta_dpo/gap_mean": out.gap_mean, "beta_dpo/gap_std": out.gap_std}
            )
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
        self, batch: dict[str, torch.Tensor], n_rows: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Token-mean NLL of the completion (chosen) tokens over the global batch: Σ_tokens −log p / N_tokens."""
        logps, n_tokens = self._logps(self.model, batch, slice(0, n_rows))
        # Divide by the global token count per rank so DDP's gradient average equals the global token mean.
        global_tokens = self.global_sum(n_tokens.sum().float())
        loss = -logps.sum() / (global_tokens / self.world_size).clamp_min(1.0)
        per_pair = {
            "loss": -logps.detach() / n_tokens.clamp_min(1),
            "logps/chosen": logps.detach(),
            "nll_per_token": -logps.detach() / n_tokens.clamp_min(1),
        }
        return loss, per_pair, {}


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
