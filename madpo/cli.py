"""The command line: `python cli.py fit|validate|test|predict -c ...` (LightningCLI), `python cli.py pipeline ...`.

The model is picked by `class_path` in the YAML (`madpo.RewardLightningModule` or `madpo.PolicyLightningModule`); the
data always goes through `PreferenceDataModule`. Two ModelCheckpoints (`checkpoint`: the best on val/loss;
`last_checkpoint`: `last.ckpt`, the latest state), the TensorBoard logger and a process-group teardown are on by
default; `predict` writes its samples with `madpo.predict.PredictionWriter` (`--predictions.path`).

Errors: a user error (bad data, config or path; see `madpo.errors`) prints one `madpo: error: <message>` line on
stderr and exits with status 2, as a bad argument does; a bug shows its traceback (exit 1). `MADPO_DEBUG=1` or
`--debug` (anywhere on the command line) shows the traceback of user errors too.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
import warnings

from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from madpo.callbacks import DestroyProcessGroup, LatestCheckpoint, PairThroughput
from madpo.data import PreferenceDataModule
from madpo.errors import DEBUG_ENV, report_user_error
from madpo.predict import PredictionWriter


class MadpoCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # two checkpoints: the best on val/loss, and `last.ckpt`, the latest state that `--ckpt_path last` resumes.
        # One callback cannot do both: Lightning 2.6 rewrites a monitored callback's last.ckpt only at the steps it
        # saves a new best, so a resume would go back to the best step rather than continue from the latest.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")
        # last.ckpt follows the checkpoint schedule the user sets (`--checkpoint.every_n_train_steps` and the rest)
        linked = ("dirpath", "every_n_train_steps", "every_n_epochs", "save_on_train_epoch_end", "save_weights_only")
        for name in linked:
            parser.link_arguments(f"checkpoint.{name}", f"last_checkpoint.{name}")
        parser.set_defaults(
            {
                "checkpoint.save_last": False,
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
            }
        )
        parser.add_lightning_class_args(DestroyProcessGroup, "process_group")
        parser.add_lightning_class_args(PairThroughput, "throughput")
        # `predict` writes its rows here (a callback: it gathers every rank's share and writes once, on rank 0)
        parser.add_lightning_class_args(PredictionWriter, "predictions")
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


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _quiet_known_noise() -> None:
    """Drop what every run printed that no user can act on; genuine warnings stay."""
    # Lightning 2.6 calls a torch pytree API that torch deprecated: Lightning's to fix, printed on every fit
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # an advertisement for Lightning's cloud logger, on every Trainer
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTip) for f in logger.filters):
        logger.addFilter(_DropLightningTip())


def _run(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "pipeline":
        from madpo.pipeline.run import main as pipeline_main

        pipeline_main(args[1:])
        return
    if args and args[0] == "export":
        from madpo.export import main as export_main

        export_main(args[1:])
        return
    _quiet_known_noise()
    # from the command line (argv None) LightningCLI reads sys.argv itself: passing it again as `args` warns
    cli_main(argv)


def main(argv: list[str] | None = None) -> None:
    """`python cli.py ...`: run a subcommand; a user error ends it with one line on stderr and exit status 2."""
    # --debug is no parser's option: taken out here (of sys.argv too, which LightningCLI and DDP launchers re-read);
    # the environment variable carries it to DDP child processes
    if "--debug" in (sys.argv if argv is None else argv):
        if argv is None:
            sys.argv = [a for a in sys.argv if a != "--debug"]
        else:
            argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    try:
        _run(argv)
    except Exception as e:  # noqa: BLE001 - user errors end here, everything else propagates with its traceback
        status = report_user_error(e)
        if status is None:
            raise
        sys.exit(status)
