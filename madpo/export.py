"""`python cli.py export --ckpt <last.ckpt> --out <dir>`: a Lightning checkpoint to a plain transformers directory.

`fit` already exports at its end; this rebuilds the same directory from any checkpoint (an earlier step, the best
one). The checkpoint loads with `weights_only=True`. A sharded checkpoint (a directory, as FSDP2 and FSDP1 with
`state_dict_type: sharded` write it) is gathered into CPU memory first, in this one process: no process group needed.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from madpo.modules import PolicyLightningModule, RewardLightningModule
from madpo.modules.base import LoraOptions, OptimizerOptions
from madpo.sharding import load_distributed_checkpoint


def _module_class(state_dict: dict[str, Any], hparams: dict[str, Any]) -> type:
    if "loss" in hparams:
        return PolicyLightningModule
    if any(k.startswith("model.") and k.endswith(("score.weight", "classifier.weight")) for k in state_dict):
        return RewardLightningModule
    raise ValueError("checkpoint is neither a PolicyLightningModule nor a RewardLightningModule checkpoint")


def export_checkpoint(ckpt_path: str, out_dir: str) -> str:
    if os.path.isdir(ckpt_path):
        checkpoint = load_distributed_checkpoint(ckpt_path)
    else:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "model_name_or_path" not in hparams:
        raise ValueError(f"{ckpt_path}: no madpo hyper_parameters (model_name_or_path) in the checkpoint")
    cls = _module_class(checkpoint["state_dict"], hparams)
    for key, options in (("optimizer", OptimizerOptions), ("lora", LoraOptions)):
        if isinstance(hparams.get(key), dict):
            hparams[key] = options(**hparams[key])
    module = cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in missing if k.startswith("model.")]
    if missing or [k for k in unexpected if k.startswith("model.")]:
        raise ValueError(
            f"{ckpt_path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return module.export(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cli.py export", description=__doc__)
    parser.add_argument(
        "--ckpt", required=True, help="a Lightning checkpoint written by `cli.py fit` (a file, or a sharded directory)"
    )
    parser.add_argument("--out", required=True, help="output directory (transformers format)")
    args = parser.parse_args(argv)
    print(f"[madpo] exported to {export_checkpoint(args.ckpt, args.out)}")
