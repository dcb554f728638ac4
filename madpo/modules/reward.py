"""RewardLightningModule: a Bradley–Terry reward model r_φ(x, y), read at the last non-pad token or averaged over
the non-pad tokens (`pooling`)."""

from __future__ import annotations

from typing import Literal

import torch

from madpo import losses as L
from madpo.modeling import init_reward_model, load_tokenizer, pair_rewards
from madpo.modules.base import LoraOptions, OptimizerOptions, PairwiseModule
from madpo.modules.policy import _apply_lora


class RewardLightningModule(PairwiseModule):
    """Bradley–Terry reward model: loss −log σ(r(x, y_w) − r(x, y_l) − δ) on prompt + completion text, docs/method.md
    eq. (21); δ is the pair's `margin` column when the data has one (as TRL's RewardTrainer and Llama 2 do), else 0.

    The backbone of `model_name_or_path` gets a fresh `Linear(hidden, 1)` head (AutoModelForSequenceClassification,
    one label); the score is read from the final hidden states as `pooling` says, from the attention mask, whatever
    the padding side (`madpo.modeling.pair_rewards`, which scoring calls too). At the end of `fit` the model is
    exported as a transformers directory: that path is what `--data.reward_model` takes; its `config.json` records
    the pooling (`madpo_reward_pooling`), so scoring reads the reward the way it was trained.

    Args:
        model_name_or_path: Hub id or local directory of the backbone (also the tokenizer): a causal LM or an encoder
            such as BERT (e.g. a sentence-embedding model, with `pooling: mean`, the pooling it was trained with).
        center_rewards_coefficient: Adds coef · mean((r_w + r_l)²) to keep rewards centred (TRL's option; 0 = off).
        optimizer: AdamW and schedule options.
        lora: LoRA adapter options (the head always trains); null: full fine-tuning.
        dtype: Weights dtype to load (float32, bfloat16, float16) or null for the checkpoint's default.
        gradient_checkpointing: Trade compute for activation memory.
        on_nonfinite_loss: A non-finite training loss raises (naming step, batch and pair rows) or, with 'skip',
            skips that optimiser step on every rank and counts it (train/nonfinite_steps_skipped).
        export: Write the trained reward model as a transformers directory at the end of fit.
        export_dir: Where to export (default: <log_dir>/hf_model).
        trust_remote_code: Allow custom modelling code from the checkpoint (off unless you ask).
        pooling: 'last': the head on the last non-pad token's hidden state (a causal LM has read the whole text
            there); 'mean': on the mean of the non-pad tokens' hidden states.
    """

    metric_names = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")

    def __init__(
        self,
        model_name_or_path: str,
        center_rewards_coefficient: float = 0.0,
        optimizer: OptimizerOptions | None = None,
        lora: LoraOptions | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
        export: bool = True,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        pooling: Literal["last", "mean"] = "last",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_options = optimizer or OptimizerOptions()
        tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        self.model = init_reward_model(
            model_name_or_path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            pad_token_id=tokenizer.pad_token_id,
            pooling=pooling,
        )
        self.lora = lora
        if lora is not None:
            head = "score" if hasattr(self.model, "score") else "classifier"
            self.model = _apply_lora(self.model, lora, task_type="SEQ_CLS", modules_to_save=[head])
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are

    def compute(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        n_pairs = batch["index"].numel()
        if batch["input_ids"].shape[0] != 2 * n_pairs:
            raise ValueError("the reward model trains on preference pairs; the batch holds single completions")
        rewards = pair_rewards(self.model, batch["input_ids"], batch["attention_mask"])  # one forward, 2B rows
        chosen, rejected = rewards[:n_pairs], rewards[n_pairs:]
        losses = L.bradley_terry_losses(chosen, rejected, target_margin=batch.get("margin"))
        coef = self.hparams.center_rewards_coefficient
        if coef:
            losses = losses + coef * (chosen + rejected) ** 2
        per_pair = {
            "loss": losses,
            "accuracy": (chosen > rejected).float(),
            "margin": (chosen - rejected).detach(),
            "rewards/chosen": chosen.detach(),
            "rewards/rejected": rejected.detach(),
        }
        return losses.mean(), per_pair, {}
