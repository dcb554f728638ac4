"""TensorBoard views: throughput scalars, margin/weight histograms, sample generations as text, final hparams."""

from __future__ import annotations

import glob

import torch

from madpo.callbacks import SampleGenerations
from madpo.cli import cli_main
from madpo.modeling import init_reward_model, load_tokenizer
from madpo.modules import PolicyLightningModule
from tests.conftest import TINY_LLAMA
from tests.helpers import tiny_args


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulators = []
    for path in glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path, size_guidance={"tensors": 0, "histograms": 0})
        acc.Reload()
        accumulators.append(acc)
    tags: dict[str, set] = {}
    for acc in accumulators:
        for kind, names in acc.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, set()).update(names)
    return tags, accumulators


def test_tensorboard_shows_throughput_histograms_samples_and_hparams(tmp_path):
    rm_dir = tmp_path / "rm"
    tok = load_tokenizer(TINY_LLAMA)
    init_reward_model(TINY_LLAMA, pad_token_id=tok.pad_token_id).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    cli_main(
        tiny_args(
            "madpo.yaml",
            tmp_path,
            f"--data.reward_model={rm_dir}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.callbacks+=madpo.callbacks.SampleGenerations",
            "--trainer.callbacks.every_n_steps=2",
            "--trainer.callbacks.max_new_tokens=8",
        )
    )
    tags, accumulators = _events(tmp_path / "runs" / "run" / "version_0")
    assert {"train/pairs_per_sec", "train/tokens_per_sec"} <= tags["scalars"]
    assert {"rm/margin", "madpo/weight"} <= tags["histograms"]
    assert any(t.startswith("samples") for t in tags["tensors"])
    texts = [
        e for acc in accumulators for t in acc.Tags()["tensors"] if t.startswith("samples") for e in acc.Tensors(t)
    ]
    assert [e.step for e in texts] == [2] and b"This movie was" in texts[0].tensor_proto.string_val[0]
    plugins = {p for acc in accumulators for p in acc.PluginTagToContent("hparams")} if accumulators else set()
    assert plugins  # hparams with the final validation metrics
    assert "hparams/val/loss" in tags["scalars"]


def test_sample_generations_are_reproducible_and_leave_the_mode_alone():
    module = PolicyLightningModule(TINY_LLAMA, loss="dpo")
    callback = SampleGenerations(prompts=["a", "the film"], max_new_tokens=6, seed=3)
    first = callback.generate(module)
    assert module.model.training
    assert callback.generate(module) == first and len(first) == 2
    with torch.no_grad():
        next(module.model.parameters()).add_(1.0)
    assert callback.generate(module) != first
