"""Losses as components: each `PreferenceLoss` equals its pure function bitwise, declares its data, shows its own
options in the CLI, and a new loss is one class plus one YAML (HingeLoss below: defined here, trained from a YAML)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from madpo import losses as L
from madpo.cli import cli_main
from madpo.losses import (
    BetaDPOLoss,
    DPOLoss,
    IPOLoss,
    LogProbs,
    LossContext,
    LossOutput,
    MADPOLoss,
    PreferenceLoss,
    SFTLoss,
    build_loss,
    loss_config,
    pair_metrics,
)
from madpo.pipeline import stages
from madpo.pipeline.config import PipelineConfig
from tests.conftest import REPO, TINY_LLAMA
from tests.helpers import scalars


class HingeLoss(PreferenceLoss):
    """SLiC hinge max(0, 1 − β h): a loss that lives outside the library.

    Args:
        beta: Scale of the implicit margin.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, policy, reference, batch, ctx):  # noqa: ANN001, ANN201
        losses = L.hinge_losses(policy.chosen, policy.rejected, *reference, beta=self.beta)
        return LossOutput(losses, pair_metrics(self.beta, policy, reference))


def _pairs(n: int = 8, seed: int = 0) -> tuple[LogProbs, tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-20 - 10 * torch.rand(n, generator=g) for _ in range(4))
    counts = torch.randint(1, 30, (2, n), generator=g)
    batch = {"index": torch.arange(n), "rm_margin": 8 * torch.randn(n, generator=g)}
    return LogProbs(pc, counts[0], pr, counts[1]), (rc, rr), batch


def test_pair_losses_equal_their_pure_functions_bitwise() -> None:
    policy, ref, batch = _pairs()
    args = (policy.chosen, policy.rejected, *ref)
    ctx = LossContext(stage="train")
    assert torch.equal(DPOLoss(beta=0.2)(policy, ref, batch, ctx).losses, L.dpo_losses(*args, beta=0.2))
    assert torch.equal(IPOLoss(beta=0.3)(policy, ref, batch, ctx).losses, L.ipo_losses(*args, beta=0.3))
    c, r = policy.chosen_tokens.float(), policy.rejected_tokens.float()
    normalised = (args[0] / c, args[1] / r, args[2] / c, args[3] / r)
    out = IPOLoss(length_normalize=True)(policy, ref, batch, ctx)
    assert torch.equal(out.losses, L.ipo_losses(*normalised, beta=0.1))
    for variant in L.VARIANTS:
        loss = MADPOLoss(beta=0.1, c_max=2.0, lam=0.5, variant=variant)
        out = loss(policy, ref, batch, ctx)
        expected, weights = L.madpo_losses_and_weights(
            *args, batch["rm_margin"], beta=0.1, c_max=2.0, lam=0.5, variant=variant
        )
        assert torch.equal(out.losses, expected), variant
        assert torch.equal(out.metrics["madpo/weight_mean"], weights)
    assert torch.equal(HingeLoss(0.5)(policy, ref, batch, ctx).losses, L.hinge_losses(*args, beta=0.5))
    metrics = DPOLoss()(policy, ref, batch, ctx).metrics
    assert torch.equal(metrics["rewards/chosen"], 0.1 * (policy.chosen - ref[0]))
    assert set(metrics) | {"loss"} == set(L.PAIR_METRICS)


def test_beta_dpo_loss_equals_beta_dpo_and_keeps_its_state_in_buffers() -> None:
    policy, ref, batch = _pairs(10)
    loss, twin = BetaDPOLoss(rho=0.5), L.BetaDPO(beta=0.1, alpha=0.6, rho=0.5, momentum=0.9)
    for step in range(3):
        out = loss(policy, ref, batch, LossContext(stage="train"))
        expected = twin(policy.chosen, policy.rejected, *ref, all_gather=lambda x: x, order_key=batch["index"])
        assert torch.equal(out.losses, expected.losses), step
        assert torch.equal(out.metrics["beta_dpo/kept"], expected.mask.float())
        assert torch.equal(out.scalars["beta/effective"], expected.beta)
        assert torch.equal(out.scalars["beta_dpo/clamped"], expected.clamped)
    assert set(loss.state_dict()) == {"gap_mean", "gap_std", "step"} and int(loss.step) == 3
    loss(policy, ref, batch, LossContext(stage="val"))
    assert int(loss.step) == 3  # evaluation reads the EMA only


def test_sft_loss_is_the_token_mean_nll() -> None:
    policy, _, batch = _pairs()
    out = SFTLoss()(LogProbs(policy.chosen, policy.chosen_tokens), None, batch, LossContext(stage="train"))
    assert torch.equal(out.loss, -policy.chosen.sum() / policy.chosen_tokens.sum().float().clamp_min(1.0))
    assert torch.equal(out.metrics["nll_per_token"], -policy.chosen / policy.chosen_tokens.clamp_min(1))


def test_data_requirements_per_loss() -> None:
    got = {
        type(loss).__name__: dataclasses.astuple(loss.data_requirements())
        for loss in (SFTLoss(), DPOLoss(), IPOLoss(), BetaDPOLoss(), MADPOLoss(), HingeLoss())
    }
    # (pairs, reference_logps, rm_margin)
    assert got == {
        "SFTLoss": (False, False, False),
        "DPOLoss": (True, True, False),
        "IPOLoss": (True, True, False),
        "BetaDPOLoss": (True, True, False),
        "MADPOLoss": (True, True, True),
        "HingeLoss": (True, True, False),
    }


def test_a_loss_round_trips_through_its_plain_config() -> None:
    loss = MADPOLoss(beta=0.2, c_max=2.0, variant="amp_only")
    config = loss_config(loss)
    assert config["class_path"] == "madpo.losses.MADPOLoss" and config["init_args"]["c_max"] == 2.0
    rebuilt = build_loss(config)
    assert type(rebuilt) is MADPOLoss and rebuilt.init_args() == loss.init_args()
    assert loss_config(HingeLoss(0.3)) == {"class_path": "tests.test_components.HingeLoss", "init_args": {"beta": 0.3}}


def test_print_config_shows_the_loss_class_and_its_options(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "-c", str(REPO / "configs/tiny/madpo.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "class_path: madpo.losses.MADPOLoss" in out
    for key in ("c_max: 4.0", "tau:", "variant: full", "normalize_weights:"):
        assert key in out, key
    with pytest.raises(SystemExit):
        cli_main(
            ["fit", "--model", "madpo.PolicyLightningModule", "--model.init_args.loss.help", "madpo.losses.MADPOLoss"]
        )
    assert "Amplification intensity c_max" in capsys.readouterr().out


def test_a_new_loss_is_one_class_and_one_yaml(tmp_path) -> None:
    config = yaml.safe_load((REPO / "configs/tiny/dpo.yaml").read_text())
    config["model"]["init_args"]["loss"] = {
        "class_path": "tests.test_components.HingeLoss",
        "init_args": {"beta": 0.2},
    }
    config["model"]["init_args"]["model_name_or_path"] = TINY_LLAMA
    for key in ("train_files", "val_files"):
        config["data"][key] = str(REPO / config["data"][key])
    path = tmp_path / "hinge.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(
        [
            "fit",
            "-c",
            str(path),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.logger.init_args.name=hinge",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            f"--data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    log_dir = tmp_path / "runs" / "hinge" / "version_0"
    tags = scalars(log_dir)
    assert "train/loss_step" in tags and "val/rewards/accuracies" in tags
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["loss"]["class_path"] == "tests.test_components.HingeLoss"
    assert ckpt["hyper_parameters"]["loss"]["init_args"] == {"beta": 0.2}
    from madpo.modules import PolicyLightningModule

    module = PolicyLightningModule.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert type(module.loss) is HingeLoss and module.loss.beta == 0.2


def _policy_key(monkeypatch, tmp_path, policy) -> tuple:  # noqa: ANN001
    """(key, directory label, what the key hashes) of the policy stage, on stand-in upstream results."""
    up = stages.StageResult("x", "x", tmp_path, "abc", {}, cached=True)
    training = stages.TrainingSettings.of(PipelineConfig().trainer)
    inputs = stages.PolicyInputs.of(policy, (16, 64), training, up, up, up)
    return inputs.key, stages.policy_label(policy), stages.base._canonical(inputs)


def test_dpo_stage_key_ignores_madpo_knobs(monkeypatch, tmp_path) -> None:
    base = PipelineConfig().policy
    dpo = dataclasses.replace(base, method="dpo")
    dpo_other = dataclasses.replace(dataclasses.replace(base, loss=MADPOLoss(c_max=2.0, tau=3.0)), method="dpo")
    key, label, config = _policy_key(monkeypatch, tmp_path, dpo)
    assert config["loss"] == {"class": "madpo.losses.DPOLoss", "beta": 0.1}
    assert label == "policy-dpo-high-s0"
    assert _policy_key(monkeypatch, tmp_path, dpo_other)[0] == key
    # no reward model upstream and no margin perturbation in a loss that reads no margins
    assert config["margins"] is None and "margin_noise_std" not in config
    noisy = dataclasses.replace(dpo, margin_noise_std=0.5, margin_flip_fraction=0.1)
    assert _policy_key(monkeypatch, tmp_path, noisy)[0] == key
    assert _policy_key(monkeypatch, tmp_path, dataclasses.replace(dpo, loss=DPOLoss(beta=0.2)))[0] != key
    madpo = _policy_key(monkeypatch, tmp_path, base)
    assert madpo[1] == "policy-madpo-high-s0" and madpo[2]["loss"]["c_max"] == 4.0
    amp = _policy_key(monkeypatch, tmp_path, dataclasses.replace(base, method="madpo_amp_only"))
    assert amp[1] == "policy-madpo_amp_only-high-s0" and amp[2]["loss"]["variant"] == "amp_only"
    assert amp[0] != madpo[0]
