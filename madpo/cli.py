"""The command line: `python cli.py fit|validate|test --config ...` (LightningCLI) and `python cli.py pipeline ...`.

The model is picked by `class_path` in the YAML (`madpo.RewardLightningModule` or `madpo.PolicyLightningModule`); the
data always goes through `PreferenceDataModule`. A ModelCheckpoint (last + best on val/loss), the TensorBoard logger
and a process-group teardown are on by default.
"""

from __future__ import annotations

import glob
import os
import re
import sys

from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from madpo.callbacks import DestroyProcessGroup, PairThroughput
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
        parser.add_lightning_class_args(PairThroughput, "throughput")
        # the DataModule tokenizes with the model's own tokenizer
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")

    def before_fit(self) -> None:
        kwargs = self.config_init[self.subcommand]
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True  # resume without unpickling arbitrary objects (--weights_only false opts out)
        self._resolve_last_checkpoint()

    def _resolve_last_checkpoint(self) -> None:
        """`--ckpt_path last`: continue the newest version of this run (same log directory) from its last.ckpt.

        Lightning alone would look in a fresh version directory and start from scratch.
        """
        kwargs = self.config_init[self.subcommand]
        logger = self.trainer.logger
        if kwargs.get("ckpt_path") != "last" or not isinstance(logger, TensorBoardLogger):
            return
        found = []
        for path in glob.glob(os.path.join(logger.root_dir, "version_*", "checkpoints", "last.ckpt")):
            match = re.search(r"version_(\d+)", path)
            if match:
                found.append((int(match.group(1)), path))
        if not found:
            rank_zero_warn(f"--ckpt_path last: no last.ckpt under {logger.root_dir}; training from scratch")
            kwargs["ckpt_path"] = None
            return
        version, path = max(found)
        logger._version = version  # log into the interrupted run's directory
        kwargs["ckpt_path"] = path


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
    if argv and argv[0] == "export":
        from madpo.export import main as export_main

        export_main(argv[1:])
        return
    cli_main(argv)
