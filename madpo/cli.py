"""The command line: `python cli.py fit|validate|test --config ...` (LightningCLI) and `python cli.py pipeline ...`.

The model is picked by `class_path` in the YAML (`madpo.RewardLightningModule` or `madpo.PolicyLightningModule`); the
data always goes through `PreferenceDataModule`. A ModelCheckpoint (last + best on val/loss), the TensorBoard logger
and a process-group teardown are on by default.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from madpo.callbacks import DestroyProcessGroup
from madpo.data import PreferenceDataModule


class MadpoCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
            }
        )
        parser.add_lightning_class_args(DestroyProcessGroup, "process_group")
        # the DataModule tokenizes with the model's own tokenizer
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")


def cli_main(args: list[str] | None = None, run: bool = True) -> MadpoCLI:
    return MadpoCLI(
        model_class=LightningModule,
        datamodule_class=PreferenceDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "pipeline":
        from madpo.pipeline.run import main as pipeline_main

        pipeline_main(argv[1:])
        return
    cli_main(argv)
