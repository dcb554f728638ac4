"""TensorBoard views (throughput scalars, margin/weight histograms, sample generations, final hparams) and
KeepBestWeights."""

from __future__ import annotations

import glob
from pathlib import Path

import lightning as L
import pytest
import torch

from madpo.callbacks import KeepBestWeights, SampleGenerations
from madpo.cli import cli_main
from madpo.losses import DPOLoss
from madpo.modeling import init_reward_model, load_tokenizer
from madpo.modules import PolicyLightningModule
from tests.conftest import TINY_LLAMA
from tests.helpers import scalars, tiny_args


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
    module = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss())
    callback = SampleGenerations(prompts=["a", "the film"], max_new_tokens=6, seed=3)
    first = callback.generate(module)
    assert module.model.training
    assert callback.generate(module) == first and len(first) == 2
    with torch.no_grad():
        next(module.model.parameters()).add_(1.0)
    assert callback.generate(module) != first


class _ScriptedValLoss(L.LightningModule):
    """One trainable scalar that moves every step; validation reports a scripted loss per validation round."""

    def __init__(self, val_losses: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.frozen = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.val_losses, self.round, self.w_at_round = val_losses, 0, []

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        return (self.w - 100.0) ** 2  # pulls w steadily away from 0

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        self.log("val/loss", self.val_losses[self.round])

    def on_validation_epoch_end(self) -> None:
        self.w_at_round.append(float(self.w))
        self.round += 1

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.01)


def _fit_scripted(
    val_losses: list[float], mode: str = "min", monitor: str = "val/loss"
) -> tuple[_ScriptedValLoss, KeepBestWeights]:
    module, keep = _ScriptedValLoss(val_losses), KeepBestWeights(monitor=monitor, mode=mode)
    data = torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)
    trainer = L.Trainer(
        max_steps=8,
        val_check_interval=2,
        callbacks=[keep],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        limit_val_batches=1,
    )
    trainer.fit(module, data, data)
    return module, keep


@pytest.mark.parametrize(("mode", "best_round"), [("min", 1), ("max", 2)])
def test_keep_best_weights_restores_the_best_validation_round(mode: str, best_round: int) -> None:
    losses = [3.0, 1.0, 5.0, 2.0]  # validations after steps 2, 4, 6, 8
    module, keep = _fit_scripted(losses, mode)
    assert module.round == 4 and keep.best == losses[best_round]
    assert keep.best_step == 2 * (best_round + 1)
    # the weights are those of the best round, not the last step's, and the frozen parameter was left alone
    assert float(module.w) == module.w_at_round[best_round] != module.w_at_round[-1]
    assert float(module.frozen) == 1.0 and "frozen" not in keep._state


def test_keep_best_weights_names_a_missing_metric() -> None:
    with pytest.raises(KeyError, match="val/accuracy"):
        _fit_scripted([1.0] * 4, monitor="val/accuracy")
    with pytest.raises(ValueError, match="mode"):
        KeepBestWeights(mode="lowest")


def _fit_reward_with_keep_best_weights(tmp_path) -> Path:  # noqa: ANN001
    """A 6-step reward run validating every 2 steps, every validation checkpointed, with KeepBestWeights.

    The learning rate warms up linearly over the whole run to 0.05 (AdamW moves every weight by about the learning
    rate per step), so the last steps are the largest and overshoot: the last validation is worse than an earlier one
    by far more than any CPU's rounding (val/loss ~0.69, 0.69, 0.86 here), whichever earlier one is the best."""
    cli_main(
        tiny_args(
            "reward.yaml",
            tmp_path,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=6",
            "--trainer.val_check_interval=2",
            "--trainer.callbacks+=madpo.callbacks.KeepBestWeights",
            "--checkpoint.save_top_k=-1",
            "--model.optimizer.lr=0.05",
            "--model.optimizer.warmup_ratio=1.0",
        )
    )
    return tmp_path / "runs" / "run" / "version_0"


def _validations_and_export(version: Path) -> tuple[dict[int, float], list[int]]:
    """Every validation's global step -> the val/loss its checkpoint recorded (ModelCheckpoint's current_score), and
    the steps whose checkpointed weights are exactly those exported to hf_model/."""
    from safetensors.torch import load_file

    exported = load_file(next((version / "hf_model").glob("*.safetensors")))
    scores, matches = {}, []
    for path in (version / "checkpoints").glob("epoch=*-step=*.ckpt"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
        step, weights = checkpoint["global_step"], checkpoint["state_dict"]
        scores[step] = float(state["current_score"])
        # hf_model/ is the module's `model` as a transformers directory: the state-dict keys without "model."
        assert {f"model.{k}" for k in exported} == {k for k in weights if k.startswith("model.")}
        if all(torch.equal(v, weights[f"model.{k}"]) for k, v in exported.items()):
            matches.append(step)
    return scores, sorted(matches)


@pytest.mark.parametrize("keep_best", ["real", "broken_exports_last"])
def test_cli_fit_with_keep_best_weights_exports_the_best_checkpoints_weights(
    keep_best, tmp_path, capsys, monkeypatch
) -> None:
    """`--trainer.callbacks+=madpo.callbacks.KeepBestWeights`: hf_model/ holds exactly the weights of the checkpoint
    with the lowest val/loss (found from the run's own checkpoints and logs, not hard-coded), not the last step's.
    The `broken` case checks that this check catches a KeepBestWeights that leaves the last weights in place."""
    if keep_best != "real":
        monkeypatch.setattr(KeepBestWeights, "on_fit_end", lambda self, trainer, pl_module: None)
    version = _fit_reward_with_keep_best_weights(tmp_path)
    scores, exported_steps = _validations_and_export(version)
    print(keep_best, "val/loss by step:", scores, "export = weights of step(s)", exported_steps)
    logged = [value for _, value in sorted(scalars(version)["val/loss"])]
    assert logged == pytest.approx([scores[s] for s in sorted(scores)], rel=1e-6)  # the checkpoints are the validations
    best, last = min(scores, key=scores.get), max(scores)
    assert sorted(scores) == [2, 4, 6] and best != last and scores[last] > scores[best] + 0.01, scores
    if keep_best != "real":
        assert exported_steps == [last], (exported_steps, scores)  # so the assertion below would fail
        return
    assert exported_steps == [best], (exported_steps, scores)  # the best checkpoint's weights, no other validation's
    out = capsys.readouterr().out
    assert f"restored the best weights: step {best}, val/loss = {scores[best]:.4f}" in out
    assert f"(fit ended at step {last})" in out
