"""The step skeleton both LightningModules share: forward on the stacked 2B batch, per-pair statistics gathered
across ranks, torchmetrics with the same names in train and val, a finite-loss guard, the optimiser and schedule,
and export to a plain transformers directory."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MinMetric

from madpo.data.requirements import DataRequirements
from madpo.errors import UserError
from madpo.modeling import load_tokenizer
from madpo.serialize import jsonable
from madpo.sharding import clean_name, data_parallel_mesh, full_state_dict, is_sharded, shard_modules, uses_fully_shard

log = logging.getLogger(__name__)


@dataclass
class LoraOptions:
    """LoRA adapter options (peft). The base stays frozen; only adapter (and head) parameters train."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator (lora_alpha)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt."""
    adapter_path: str | None = None
    """Load an existing adapter (e.g. the SFT adapter) instead of creating a new one."""
    freeze_loaded_adapter: bool = True
    """With adapter_path: keep the loaded adapter frozen and train a new one on top (the paper's setup)."""


@dataclass
class OptimizerOptions:
    """AdamW with linear warmup then cosine decay to zero (the paper's schedule)."""

    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices (biases and norm weights are not decayed)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of the total optimiser steps spent in linear warmup (int(ratio * total))."""
    schedule: str = "cosine"
    """'cosine' or 'constant' after warmup."""
    fused: bool | None = None
    """Fused AdamW kernel (one kernel over all parameters instead of a loop of small ops; same update rule). null:
    fused when every trainable parameter is a floating-point tensor on a device torch has a fused kernel for (CPU
    and CUDA in torch >= 2.4)."""


def _metric_key(name: str) -> str:
    return name.replace("/", "__")


class PairwiseModule(L.LightningModule):
    """Base class: subclasses implement `compute(batch, stage) -> (loss, per_pair_stats, scalar_stats)`.

    `per_pair_stats` maps metric names to (B,) tensors; they are gathered across ranks every step (one collective),
    so step and epoch values are those of the global batch, identical on every rank and equal to a single-process
    run on the same global batch. Names ending in `_min`/`_max` reduce with min/max, all others with a mean.
    """

    metric_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.nonfinite_steps_skipped = 0
        self._sharded_root: list[nn.Module] = []  # FSDP2's root unit, outside the module tree (configure_model)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": nn.ModuleDict({_metric_key(n): self._new_metric(n) for n in self.metric_names})
                for stage in ("train", "val", "test")
            }
        )  # ("train" itself would shadow nn.Module.train)

    @staticmethod
    def _new_metric(name: str) -> nn.Module:
        cls = MinMetric if name.endswith("_min") else MaxMetric if name.endswith("_max") else MeanMetric
        # inputs are already gathered across ranks; values are logged only after the finite-loss check, so the NaN
        # scan (a host-device sync per metric per step on GPU) is off
        return cls(sync_on_compute=False, nan_strategy="disable")

    # ---- the handshake with PreferenceDataModule ---------------------------------------------------------------
    def data_requirements(self) -> DataRequirements:
        return DataRequirements(pairs=True)

    # ---- distributed helpers ------------------------------------------------------------------------------------
    def gather_pairs(self, x: torch.Tensor) -> torch.Tensor:
        """All-gather a per-pair tensor (B, ...) into (world*B, ...) in rank order (identity on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        gathered = self.all_gather(x)
        return gathered.reshape(-1, *x.shape[1:])

    def global_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.trainer.strategy.reduce(x.clone(), reduce_op="sum")

    @property
    def world_size(self) -> int:
        return 1 if self._trainer is None else self.trainer.world_size

    # ---- steps --------------------------------------------------------------------------------------------------
    def compute(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, batch_idx, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """Validation's computation on the test split, logged as test/<name>."""
        return self._step(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        raise UserError(
            f"{type(self).__name__} has no predict: `predict` samples completions from a policy "
            "(madpo.PolicyLightningModule); evaluate a reward model with `test` on preference pairs"
        )

    def _step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> torch.Tensor | None:
        loss, per_pair, scalars = self._run_step(self.compute, batch, stage)
        if not self._loss_is_finite(loss, per_pair.get("loss"), batch, batch_idx, stage):
            return None  # on_nonfinite_loss="skip": every rank skips this step together
        self._log_stats(stage, per_pair, scalars)
        return loss

    def _loss_is_finite(
        self,
        loss: torch.Tensor,
        losses: torch.Tensor | None,
        batch: dict[str, torch.Tensor],
        batch_idx: int,
        stage: str,
    ) -> bool:
        """Raise on a non-finite loss (naming step, batch and pairs), or with on_nonfinite_loss='skip' count it."""
        bad_here = (~torch.isfinite(loss.detach())).float()
        if not self.global_sum(bad_here).item():  # one flag for all ranks, so they skip or go on together
            return True
        bad = batch["index"].tolist()
        if losses is not None and losses.numel() == batch["index"].numel():
            bad = batch["index"][~torch.isfinite(losses.detach())].tolist() or bad
        where = f"at global step {self.global_step}, batch {batch_idx}, rank {self.global_rank}"
        if self.hparams.get("on_nonfinite_loss", "raise") == "skip" and stage == "train":
            self.nonfinite_steps_skipped += 1
            log.warning("skipping a non-finite training loss %s; pair indices %s", where, bad)
            self.log("train/nonfinite_steps_skipped", float(self.nonfinite_steps_skipped), on_step=True, batch_size=1)
            return False
        raise FloatingPointError(
            f"non-finite {stage} loss ({loss.item()}) {where}; offending pair indices (rows of the {stage} split): "
            f"{bad}. Pass on_nonfinite_loss=skip to skip such steps (counted) instead."
        )

    def _log_stats(self, stage: str, per_pair: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor]) -> None:
        metrics = self.metrics[f"{stage}_metrics"]
        names = [n for n in per_pair if _metric_key(n) in metrics]
        if names:
            stacked = torch.stack([per_pair[n].detach().float() for n in names], dim=1)
            stacked = self.gather_pairs(stacked)
            on_step = stage == "train"
            for i, name in enumerate(names):
                metric = metrics[_metric_key(name)]
                metric(stacked[:, i])
                self.log(f"{stage}/{name}", metric, on_step=on_step, on_epoch=True, batch_size=stacked.shape[0])
        for name, value in scalars.items():
            self.log(f"{stage}/{name}", value.detach().float(), on_step=stage == "train", on_epoch=True, batch_size=1)

    # ---- sharding -----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under a sharding strategy, shard the model here (Lightning calls this after `setup`, hence after the
        DataModule scored the reference with the unsharded initial policy, and before the optimiser is built).

        FSDP2 (`ModelParallelStrategy`): each decoder layer is `fully_shard`-ed, then one root unit around the model
        (`madpo.sharding.ShardedRoot`), whose forward every step runs in. FSDP1 (`FSDPStrategy`) wraps the module
        itself afterwards. Either way each parameter's shape is recorded first, so the weight-decay
        groups see the unsharded shapes (FSDP1 leaves flat 1-D views). Without a sharding strategy nothing changes.
        """
        if not hasattr(self, "_param_ndims"):
            self._param_ndims = {name: p.ndim for name, p in self.named_parameters()}
        if uses_fully_shard(self._trainer) and not self._sharded_root:
            mesh = data_parallel_mesh(self.trainer.strategy)
            self._sharded_root.append(shard_modules({"model": self.model, **self._frozen_modules()}, mesh))

    def _frozen_modules(self) -> dict[str, nn.Module]:
        """Frozen models outside the module tree that the step runs and that are sharded beside the model."""
        return {}

    def _run_step(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, inside the FSDP2 root's forward when sharded (madpo.sharding.ShardedRoot says why)."""
        return self._sharded_root[0](fn, *args) if self._sharded_root else fn(*args)

    def _param_ndim(self, name: str, p: torch.Tensor) -> int:
        """The parameter's unsharded number of dimensions (a DTensor reports its logical shape itself)."""
        if "_flat_param" in name:
            raise UserError(
                "FSDP with use_orig_params=False: the optimiser would see flat parameters (no names, no shapes, the "
                "root's missing); keep Lightning's FSDPStrategy default (use_orig_params=True)"
            )
        return getattr(self, "_param_ndims", {}).get(clean_name(name), p.ndim)

    # ---- optimiser ----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt: OptimizerOptions = self.optimizer_options
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        decay = [p for n, p in named if self._param_ndim(n, p) >= 2]
        no_decay = [p for n, p in named if self._param_ndim(n, p) < 2]
        fused = _fused_adamw_supported(params) if opt.fused is None else opt.fused
        if opt.fused is None and "mixed" in str(self.trainer.precision) and self.trainer.gradient_clip_val:
            fused = False  # Lightning refuses gradient clipping with a fused optimizer under mixed precision
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=opt.lr,
            betas=tuple(opt.betas),
            eps=opt.eps,
            **({"fused": True} if fused else {}),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(opt.warmup_ratio * total)
        if opt.schedule not in ("cosine", "constant"):
            raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {opt.schedule!r}")

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if opt.schedule == "constant":
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # configure_optimizers reads trainer.estimated_stepping_batches, which builds the train loader before the
        # checkpoint's loop state is restored; Lightning (2.6) then never hands the loader its saved position. Hand it
        # over here, before the first batch is drawn, so a mid-epoch resume continues with the untrained batches.
        loop = self.trainer.fit_loop
        if getattr(loop, "_combined_loader_states_to_load", None) and hasattr(loop, "_load_combined_loader_states"):
            loop._load_combined_loader_states()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._has_dropout():
            # Lightning does not checkpoint the global RNG, so a resumed run would draw other dropout masks: seed
            # each batch's from where it stands in the run instead, so masks depend on the step, not on the history
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            torch.manual_seed(hash((seed, self.global_step, batch_idx, self.global_rank)) % 2**63)
        if self.trainer.optimizers:
            self.log(
                "train/learning_rate", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=1
            )

    def _has_dropout(self) -> bool:
        if not hasattr(self, "_dropout_active"):
            config = getattr(getattr(self, "model", None), "config", None)
            attention = max(float(getattr(config, k, 0.0) or 0.0) for k in ("attention_dropout", "attn_pdrop"))
            self._dropout_active = attention > 0 or any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())
        return self._dropout_active

    # ---- export -------------------------------------------------------------------------------------------------
    def _log_final_hparams(self) -> None:
        """The run's hyperparameters beside its final validation metrics (TensorBoard's HPARAMS tab)."""
        metrics = _final_metrics(self.trainer)
        if metrics and self.logger is not None:
            hparams = jsonable(dict(self.hparams), default=str)
            self.logger.log_hyperparams(hparams, {f"hparams/{k}": v for k, v in metrics.items()})

    def default_export_dir(self) -> str | None:
        if self._trainer is None:
            return None
        return os.path.join(self.trainer.log_dir or self.trainer.default_root_dir, "hf_model")

    def export(self, out_dir: str, *, merge_adapter: bool = True, metrics: dict[str, float] | None = None) -> str:
        """Write the model as a plain transformers directory: safetensors weights, config, tokenizer, model card.

        A LoRA model is merged into its base first (on a copy), so plain `AutoModelFor...` loads the export. A sharded
        model is gathered first: then this is collective (every rank calls it; rank 0 writes).
        """
        if metrics is None and self._trainer is not None:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        if is_sharded(self.model):
            state = full_state_dict(self.trainer.strategy.model, prefix="model.")
            if self.trainer.is_global_zero:
                self._unsharded_copy(state).export(out_dir, merge_adapter=merge_adapter, metrics=metrics)
            return out_dir
        model = self.model
        if merge_adapter and hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        load_tokenizer(
            self.hparams.model_name_or_path, trust_remote_code=self.hparams.trust_remote_code
        ).save_pretrained(out_dir)
        card = {
            "library": "madpo",
            "module": type(self).__name__,
            "hparams": jsonable(dict(self.hparams), default=str),
            "metrics": metrics or {},
        }
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(f"# {type(self).__name__} export (madpo)\n\nLoads with plain transformers.\n\n")
            f.write("```json\n" + json.dumps(card, indent=2, sort_keys=True) + "\n```\n")
        return out_dir

    def _unsharded_copy(self, model_state: dict[str, torch.Tensor]) -> PairwiseModule:
        """A fresh, unsharded module from this one's hyperparameters, holding `model_state` (this model's full state
        dict): the sharded model cannot be copied or merged in place. Costs a second copy of the model in CPU memory."""
        hparams = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        for key, options in (("optimizer", OptimizerOptions), ("lora", LoraOptions)):
            if isinstance(hparams.get(key), dict):  # as LightningCLI and checkpoints hand them over
                hparams[key] = options(**hparams[key])
        clone = type(self)(**hparams)
        clone.model.load_state_dict(model_state, strict=True)
        return clone

    def on_fit_end(self) -> None:
        self._log_final_hparams()
        if not self.hparams.get("export", True):
            return
        out_dir = self.hparams.get("export_dir") or self.default_export_dir()
        if out_dir and (self.trainer.is_global_zero or is_sharded(self.model)):  # sharded: every rank gathers
            self.export(out_dir)
            if self.trainer.is_global_zero:
                print(f"[madpo] {type(self).__name__} exported to {out_dir}")
        if self.trainer.world_size > 1:
            self.trainer.strategy.barrier("madpo-export")


def _final_metrics(trainer: Any) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}


def _fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether `torch.optim.AdamW(fused=True)` accepts these parameters (device with a fused kernel, float dtype)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - torch without the helper
        return False
    # torch < 2.4 lists no "cpu" here (its fused kernels are GPU-only), so CPU training falls back to the loop
    return bool(params) and all(
        p.device.type in devices and torch.is_floating_point(p) and not p.is_sparse for p in params
    )
