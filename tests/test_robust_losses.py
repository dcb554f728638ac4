"""cDPO, rDPO, ODPO, margin-target, hinge and RPO's NLL term as components; the per-pair `weight` column and the reward
model's `margin` column (docs/method.md eq. (21), (23)–(30))."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from madpo import losses as L
from madpo.cli import cli_main
from madpo.data.collate import PreferenceCollator
from madpo.data.formats import InvalidRowError, load_files
from madpo.data.tokenize import tokenize_dataset
from madpo.losses import (
    CDPOLoss,
    DPOLoss,
    HingeLoss,
    LogProbs,
    LossContext,
    MADPOLoss,
    MarginTargetLoss,
    ODPOLoss,
    RDPOLoss,
    WithChosenNLL,
    build_loss,
    loss_config,
)
from tests.conftest import DATA, TINY_LLAMA
from tests.helpers import scalars, tiny_args

CTX = LossContext(stage="train")
PAIR = {"prompt": "The film", "chosen": " was great.", "rejected": " was awful."}


def _pairs(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-20 - 10 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))
    counts = torch.randint(1, 30, (2, n), generator=g)
    margins = 4 * torch.randn(n, generator=g, dtype=torch.float64)
    pc, pr, rc, rr, margins = (t.to(dtype) for t in (pc, pr, rc, rr, margins))
    batch = {"index": torch.arange(n), "rm_margin": margins}
    return LogProbs(pc, counts[0], pr, counts[1]), (rc, rr), batch


def _cases(margins_positive: bool = False) -> list[tuple[L.PreferenceLoss, object]]:
    """(component, the pure function call it must equal)."""
    return [
        (CDPOLoss(beta=0.2, label_smoothing=0.15), lambda a, m: L.cdpo_losses(*a, beta=0.2, label_smoothing=0.15)),
        (RDPOLoss(beta=0.3, label_smoothing=0.2), lambda a, m: L.rdpo_losses(*a, beta=0.3, label_smoothing=0.2)),
        (ODPOLoss(beta=0.2, alpha=0.5), lambda a, m: L.odpo_losses(*a, m, beta=0.2, alpha=0.5, offset="linear")),
        (MarginTargetLoss(beta=0.1, eta=0.7), lambda a, m: L.margin_target_losses(*a, m, beta=0.1, eta=0.7)),
        (HingeLoss(beta=0.5), lambda a, m: L.hinge_losses(*a, beta=0.5)),
    ]


def test_each_component_equals_its_pure_function_bitwise() -> None:
    policy, ref, batch = _pairs()
    args = (policy.chosen, policy.rejected, *ref)
    for loss, pure in _cases():
        out = loss(policy, ref, batch, CTX)
        assert torch.equal(out.losses, pure(args, batch["rm_margin"])), type(loss).__name__
        assert set(out.metrics) | {"loss"} == set(loss.metric_names), type(loss).__name__
        assert torch.equal(out.metrics["rewards/margins"], L.pair_metrics(loss.beta, policy, ref)["rewards/margins"])
    log_offset = ODPOLoss(beta=0.2, alpha=0.5, offset="log")
    positive = {**batch, "rm_margin": batch["rm_margin"].abs() + 0.1}
    expected = L.odpo_losses(*args, positive["rm_margin"], beta=0.2, alpha=0.5, offset="log")
    assert torch.equal(log_offset(policy, ref, positive, CTX).losses, expected)
    with pytest.raises(ValueError, match="every margin must be > 0"):
        log_offset(policy, ref, batch, CTX)


def test_each_component_matches_its_formula_by_hand_in_float64() -> None:
    pc, pr, rc, rr, m = -10.0, -14.0, -12.0, -13.0, 2.5
    h = (pc - rc) - (pr - rr)  # 3.0

    def logsig(x: float) -> float:
        return -math.log1p(math.exp(-x))

    def one(loss: L.PreferenceLoss) -> float:
        t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
        policy = LogProbs(t(pc), torch.tensor([5]), t(pr), torch.tensor([6]))
        out = loss(policy, (t(rc), t(rr)), {"index": torch.arange(1), "rm_margin": t(m)}, CTX)
        assert out.losses.dtype == torch.float64
        return float(out.losses[0])

    b, eps = 0.2, 0.15
    assert one(CDPOLoss(b, eps)) == pytest.approx(-(1 - eps) * logsig(b * h) - eps * logsig(-b * h), rel=1e-14)
    rdpo = ((1 - eps) * -logsig(b * h) - eps * -logsig(-b * h)) / (1 - 2 * eps)
    assert one(RDPOLoss(b, eps)) == pytest.approx(rdpo, rel=1e-14)
    assert one(ODPOLoss(b, 0.5)) == pytest.approx(-logsig(b * h - 0.5 * m), rel=1e-14)
    assert one(ODPOLoss(b, 0.5, "log")) == pytest.approx(-logsig(b * h - 0.5 * math.log(m)), rel=1e-14)
    assert one(MarginTargetLoss(b, 0.7)) == pytest.approx((b * h - 0.7 * m) ** 2, rel=1e-14)
    assert one(HingeLoss(b)) == pytest.approx(1 - b * h, rel=1e-14)
    assert one(HingeLoss(1.0)) == 0.0  # beta h = 3 >= 1: past the hinge
    nll = one(WithChosenNLL(DPOLoss(b), alpha=0.4))
    assert nll == pytest.approx(-logsig(b * h) + 0.4 * (-pc / 5), rel=1e-14)


def test_zero_smoothing_or_offset_is_dpo_exactly() -> None:
    policy, ref, batch = _pairs()
    dpo = DPOLoss(beta=0.2)(policy, ref, batch, CTX).losses
    for loss in (CDPOLoss(0.2, 0.0), RDPOLoss(0.2, 0.0), ODPOLoss(0.2, alpha=0.0), WithChosenNLL(DPOLoss(0.2), 0.0)):
        assert torch.equal(loss(policy, ref, batch, CTX).losses, dpo), loss
    assert not torch.equal(CDPOLoss(0.2, 0.1)(policy, ref, batch, CTX).losses, dpo)


def test_options_are_checked_when_the_loss_is_built() -> None:
    for bad in (
        lambda: CDPOLoss(label_smoothing=0.6),
        lambda: RDPOLoss(label_smoothing=0.5),
        lambda: ODPOLoss(offset="square"),
        lambda: ODPOLoss(alpha=-1.0),
        lambda: MarginTargetLoss(eta=-0.1),
        lambda: HingeLoss(beta=0.0),
        lambda: WithChosenNLL(DPOLoss(), alpha=float("nan")),
    ):
        with pytest.raises(ValueError):
            bad()


def test_data_requirements_and_margin_metrics() -> None:
    got = {
        type(loss).__name__: dataclasses.astuple(loss.data_requirements())
        for loss in (CDPOLoss(), RDPOLoss(), ODPOLoss(), MarginTargetLoss(), HingeLoss())
    }
    assert got == {
        "CDPOLoss": (True, True, False),
        "RDPOLoss": (True, True, False),
        "ODPOLoss": (True, True, True),
        "MarginTargetLoss": (True, True, True),
        "HingeLoss": (True, True, False),
    }
    assert dataclasses.astuple(WithChosenNLL(ODPOLoss()).data_requirements()) == (True, True, True)
    policy, ref, batch = _pairs()
    out = ODPOLoss()(policy, ref, batch, CTX)
    assert torch.equal(out.metrics["rm/margin_mean"], batch["rm_margin"])
    with pytest.raises(ValueError, match="needs rm_margin"):
        MarginTargetLoss()(policy, ref, {"index": batch["index"]}, CTX)


def test_nll_term_adds_alpha_times_the_chosen_token_mean_nll_to_any_loss() -> None:
    policy, ref, batch = _pairs()
    nll = L.chosen_nll(policy.chosen, policy.chosen_tokens)
    for inner in (DPOLoss(0.1), MADPOLoss(c_max=2.0), CDPOLoss(), ODPOLoss()):
        wrapped = WithChosenNLL(inner, alpha=0.5)
        out = wrapped(policy, ref, batch, CTX)
        base = inner(policy, ref, batch, CTX)
        assert torch.equal(out.losses, base.losses + 0.5 * nll), type(inner).__name__
        assert torch.equal(out.metrics["nll_loss"], nll)
        assert set(wrapped.metric_names) == set(inner.metric_names) | {"nll_loss"}
        assert set(out.metrics) | {"loss"} == set(wrapped.metric_names)
    # the wrapped loss's gradient gains alpha * d nll: the chosen log-probs get -alpha / n more
    pc = policy.chosen.clone().requires_grad_(True)
    grads = []
    for loss in (DPOLoss(0.1), WithChosenNLL(DPOLoss(0.1), alpha=0.5)):
        out = loss(dataclasses.replace(policy, chosen=pc), ref, batch, CTX)
        grads.append(torch.autograd.grad(out.losses.sum(), pc)[0])
    torch.testing.assert_close(grads[1] - grads[0], -0.5 / policy.chosen_tokens.float())


def test_nll_wrapper_round_trips_through_its_plain_config() -> None:
    loss = WithChosenNLL(ODPOLoss(beta=0.2, alpha=0.3), alpha=2.0)
    config = loss_config(loss)
    assert config == {
        "class_path": "madpo.losses.WithChosenNLL",
        "init_args": {
            "loss": {
                "class_path": "madpo.losses.ODPOLoss",
                "init_args": {"beta": 0.2, "alpha": 0.3, "offset": "linear"},
            },
            "alpha": 2.0,
        },
    }
    json.dumps(config)  # plain data: a checkpoint's hparams, the pipeline's cache keys
    rebuilt = build_loss(config)
    assert (
        type(rebuilt) is WithChosenNLL and type(rebuilt.loss) is ODPOLoss and rebuilt.init_args() == config["init_args"]
    )
    assert loss_config(CDPOLoss(0.3, 0.2)) == {
        "class_path": "madpo.losses.CDPOLoss",
        "init_args": {"beta": 0.3, "label_smoothing": 0.2},
    }


# ---- the per-pair weight column -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_module():  # noqa: ANN201
    from madpo.modules import PolicyLightningModule

    torch.manual_seed(0)
    return PolicyLightningModule(TINY_LLAMA, loss=DPOLoss(beta=0.5), export=False)


def _batch(n: int = 4, seed: int = 0, vocab: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
        rows.append(
            {
                "index": i,
                "prompt_ids": ids(3 + i),
                "chosen_ids": ids(4),
                "rejected_ids": ids(2 + i),
                "ref_chosen_logps": -30.0 - i,
                "ref_rejected_logps": -25.0 + i,
            }
        )
    return PreferenceCollator(pad_token_id=0)(rows)


def _compute(module, batch):  # noqa: ANN001, ANN202
    module.zero_grad()
    loss, per_pair, _ = module.compute(batch, "train")
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return loss.detach(), per_pair, grads


def test_weight_column_multiplies_each_pairs_loss_and_gradient(policy_module) -> None:
    module = policy_module
    assert "weight/mean" in module.metric_names
    batch = _batch()
    loss0, plain, grads0 = _compute(module, batch)
    assert "weight/mean" not in plain
    w = torch.tensor([0.0, 1.0, 2.0, 1.0])
    loss_w, per_pair, grads_w = _compute(module, {**batch, "weight": w})
    assert torch.equal(per_pair["loss"], plain["loss"] * w)
    assert torch.equal(per_pair["weight/mean"], w)
    assert loss_w == pytest.approx(float((plain["loss"] * w).detach().mean()), rel=1e-6)
    assert loss_w != pytest.approx(float(loss0), rel=1e-3)
    # pair 0 has weight 0: the gradient is that of pairs 1..3 alone; pair 2's weight 2 counts it twice
    rest = {k: (v[1:] if v.shape[0] == 4 else v[[1, 2, 3, 5, 6, 7]]) for k, v in batch.items()}
    rest = {**rest, "weight": torch.tensor([1.0, 2.0, 1.0])}
    _, _, grads_rest = _compute(module, rest)
    torch.testing.assert_close(grads_w, grads_rest * 3 / 4, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads_w, grads0, rtol=1e-3)
    _, _, grads_2 = _compute(module, {**batch, "weight": torch.full((4,), 2.0)})
    torch.testing.assert_close(grads_2, 2 * grads0, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        module.compute({**batch, "weight": torch.tensor([1.0, -1.0, 1.0, 1.0])}, "train")


def test_weight_column_multiplies_after_madpos_weight(policy_module) -> None:
    module = policy_module
    batch = {**_batch(seed=1), "rm_margin": torch.tensor([-3.0, 0.5, 4.0, 9.0])}
    w = torch.tensor([0.5, 1.0, 3.0, 0.0])
    original = module.loss
    try:
        module.loss = WithChosenNLL(MADPOLoss(beta=0.5, c_max=4.0), alpha=0.3)
        _, plain, _ = _compute(module, batch)
        _, weighted, _ = _compute(module, {**batch, "weight": w})
    finally:
        module.loss = original
    assert torch.equal(weighted["loss"], plain["loss"] * w)  # w * (madpo w(m) * dpo + alpha nll)
    assert not torch.equal(plain["madpo/weight_mean"], torch.ones(4))


def _rows(n: int = 4, **column: list) -> list[dict]:
    rows = [{**PAIR, "rejected": f" was awful {i}."} for i in range(n)]
    for name, values in column.items():
        rows = [{**r, name: v} for r, v in zip(rows, values, strict=True)]
    return rows


def _write(path, rows) -> str:  # noqa: ANN001
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("weight", -0.5, "is negative"),
        ("weight", float("nan"), "is not finite"),
        ("weight", "x", "is not a number"),
        ("weight", True, "is not a number"),
        ("margin", float("inf"), "is not finite"),
        ("margin", None, "is not a number"),
    ],
)
def test_bad_weight_or_margin_is_refused_naming_file_row_and_field(tmp_path, field, value, what) -> None:
    values = [1.0, 0.0, value, 2.0]
    path = _write(tmp_path / "bad.jsonl", _rows(**{field: values}))
    with pytest.raises(InvalidRowError) as e:
        load_files(path, cache_dir=str(tmp_path / "hf"))
    msg = str(e.value)
    assert msg.startswith(f"{path}: row 2: field {field!r} ") and what in msg, msg
    raw = load_files(path, invalid_rows="drop", cache_dir=str(tmp_path / "hf"))
    assert raw.rows_out == 3 and raw.dropped == {f"bad_{field}": 1}


def test_weight_and_margin_columns_reach_the_batch(tmp_path) -> None:
    from madpo.modeling import load_tokenizer

    path = _write(tmp_path / "ok.jsonl", _rows(weight=[0, 1.5, 2, 0.25], margin=[-1, 0, 2.5, 3]))
    raw = load_files(path, cache_dir=str(tmp_path / "hf"))
    tok = load_tokenizer(TINY_LLAMA)
    tokenized, _ = tokenize_dataset(raw, tok, max_length=32)
    assert {"weight", "margin"} <= set(tokenized.column_names)
    batch = PreferenceCollator(tok.pad_token_id)([tokenized[i] for i in range(4)])
    assert torch.equal(batch["weight"], torch.tensor([0.0, 1.5, 2.0, 0.25]))
    assert torch.equal(batch["margin"], torch.tensor([-1.0, 0.0, 2.5, 3.0]))


# ---- the reward model's margin column -------------------------------------------------------------------------------


def test_reward_margin_column_shifts_the_bradley_terry_loss() -> None:
    from madpo.modules import RewardLightningModule

    torch.manual_seed(0)
    module = RewardLightningModule(TINY_LLAMA, export=False)
    batch = _batch(seed=2)
    margin = torch.tensor([-2.0, 0.0, 1.0, 5.0])
    with torch.no_grad():
        _, plain, _ = module.compute(batch, "train")
        loss, shifted, _ = module.compute({**batch, "margin": margin}, "train")
    r_c, r_r = plain["rewards/chosen"], plain["rewards/rejected"]
    assert torch.equal(shifted["rewards/chosen"], r_c)
    torch.testing.assert_close(shifted["loss"], -F.logsigmoid(r_c - r_r - margin), rtol=0, atol=1e-6)
    assert torch.equal(shifted["loss"][1], plain["loss"][1])  # margin 0: unchanged
    assert shifted["loss"][3] > plain["loss"][3] and shifted["loss"][0] < plain["loss"][0]
    assert float(loss) == pytest.approx(float(shifted["loss"].mean()))


# ---- the tiny configs train from the CLI ----------------------------------------------------------------------------

EXTRA_METRICS = {
    "odpo.yaml": ["rm/margin_mean"],
    "margin_target.yaml": ["rm/margin_mean"],
    "rpo.yaml": ["nll_loss"],
}


@pytest.mark.parametrize(
    "config", ["cdpo.yaml", "rdpo.yaml", "odpo.yaml", "margin_target.yaml", "hinge.yaml", "rpo.yaml"]
)
def test_tiny_config_trains_from_the_cli(config, tmp_path, random_reward_model) -> None:
    extra = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    extra.append("--trainer.log_every_n_steps=1")
    if config in ("odpo.yaml", "margin_target.yaml"):
        extra.append(f"--data.reward_model={random_reward_model}")
    if config == "hinge.yaml":  # weighted pairs: the first rows of the bundled data, each with a weight
        lines = (DATA / "pairs_train.jsonl").read_text().splitlines()[:32]
        rows = [{**json.loads(line), "weight": 0.5 + (i % 3)} for i, line in enumerate(lines)]
        extra.append(f"--data.train_files={_write(tmp_path / 'weighted.jsonl', rows)}")
    cli_main(tiny_args(config, tmp_path, *extra))
    log_dir = tmp_path / "runs" / "run" / "version_0"
    tags = scalars(log_dir)
    assert [s for s, _ in tags["train/loss_step"]] == [0, 1]
    for name in ["rewards/accuracies", "rewards/margins", *EXTRA_METRICS.get(config, [])]:
        assert f"train/{name}_step" in tags and f"val/{name}" in tags, name
    if config == "hinge.yaml":  # the validation rows carry no weight
        assert "val/weight/mean" not in tags
        means = [v for _, v in tags["train/weight/mean_step"]]
        assert all(0.5 <= v <= 2.5 for v in means) and means[0] != 1.0
    else:
        assert "train/weight/mean_step" not in tags
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    from madpo.modules import PolicyLightningModule

    module = PolicyLightningModule.load_from_checkpoint(log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert loss_config(module.loss) == ckpt["hyper_parameters"]["loss"]
