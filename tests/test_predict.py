"""`cli.py test` (validation's metrics on --data.test_files) and `cli.py predict` (sampled completions as JSONL)."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil

import datasets
import pytest
import torch

from madpo.cli import cli_main
from madpo.data import PreferenceDataModule
from madpo.data.formats import load_files
from madpo.data.tokenize import tokenize_dataset, tokenize_prompts
from madpo.errors import UserError
from madpo.losses import BetaDPOLoss, DPOLoss
from madpo.modeling import load_causal_lm, load_reward_model, load_tokenizer, pair_rewards, sequence_logps
from madpo.modules import PolicyLightningModule, RewardLightningModule
from madpo.predict import GenerationOptions, PredictionWriter, merge_predictions
from tests.conftest import DATA, REPO, TINY_LLAMA
from tests.helpers import run_cli_subprocess, scalars, tiny_args

SHORT = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1")
PAIRS_VAL = str(DATA / "pairs_val.jsonl")


def _args(command: str, config: str, tmp_path, *extra: str, name: str = "run") -> list[str]:
    return [command, *tiny_args(config, tmp_path, *extra, name=name)[1:]]


def _jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _writer(cli) -> PredictionWriter:
    (writer,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, PredictionWriter)]
    return writer


@pytest.fixture(scope="module")
def dpo_ckpt(tmp_path_factory) -> str:
    """A DPO policy trained for 3 steps: its log-probs differ from the reference's (the checks are not 0 = 0)."""
    tmp = tmp_path_factory.mktemp("fit")
    cli_main(tiny_args("dpo.yaml", tmp, *SHORT, "--model.init_args.export=false", name="fit"))
    return str(tmp / "runs" / "fit" / "version_0" / "checkpoints" / "last.ckpt")


# ---- test -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["dpo.yaml", "madpo.yaml", "reward.yaml"])
def test_test_metrics_equal_validate_on_the_same_file(config, tmp_path, dpo_ckpt, random_reward_model):
    # a file that is neither train_files nor val_files of the config: test must read test_files
    rows = _jsonl(DATA / "pairs_train.jsonl")[:40]
    split = _write_jsonl(tmp_path / "split.jsonl", rows)
    # a checkpoint's hyper_parameters define the model under --ckpt_path (LightningCLI), so only dpo takes dpo's
    extra = [f"--ckpt_path={dpo_ckpt}"] if config == "dpo.yaml" else []
    if config == "madpo.yaml":
        extra.append(f"--data.reward_model={random_reward_model}")
    test_args = _args("test", config, tmp_path, *extra, f"--data.test_files={split}", name="test")
    if config == "dpo.yaml":
        run_cli_subprocess(test_args)  # the command as a user types it
    else:
        cli_main(test_args)
    cli_main(_args("validate", config, tmp_path, *extra, f"--data.val_files={split}", "--data.train_files=null"))
    test = {k.removeprefix("test/"): v[-1][1] for k, v in scalars(tmp_path / "runs" / "test").items()}
    val = {k.removeprefix("val/"): v[-1][1] for k, v in scalars(tmp_path / "runs" / "run").items()}
    test = {k: v for k, v in test.items() if not k.startswith("hp_metric")}
    val = {k: v for k, v in val.items() if not k.startswith("hp_metric")}
    assert "loss" in test and set(test) == set(val)
    if config == "madpo.yaml":
        assert "madpo/weight_mean" in test and "rm/margin_mean" in test  # rm_margin was scored for the test split
    if config == "dpo.yaml":
        assert test["loss"] != pytest.approx(math.log(2), abs=1e-4)  # a trained policy: not the trivial log 2
    for name, value in val.items():
        # the subprocess uses the default thread count, this process one thread: float32 reduction order differs
        assert test[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_beta_dpo_ema_does_not_move_on_test(tmp_path):
    import lightning as L

    module = PolicyLightningModule(TINY_LLAMA, loss=BetaDPOLoss())
    torch.manual_seed(1)
    with torch.no_grad():  # away from the reference, so the gaps (and a training EMA update) are not zero
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dm = PreferenceDataModule(
        test_files=PAIRS_VAL,
        tokenizer=TINY_LLAMA,
        max_length=48,
        max_prompt_length=12,
        batch_size=16,
        cache_dir=str(tmp_path / "cache"),
    )
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    before = {k: v.clone() for k, v in module.loss.state_dict().items()}
    trainer.test(module, datamodule=dm)
    assert "test/beta_dpo/kept" in trainer.callback_metrics and "test/loss" in trainer.callback_metrics
    for key, value in module.loss.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    batch = next(iter(dm.test_dataloader()))
    module.train()
    module.compute(batch, "train")  # the control: a training step does move it
    assert module.loss.gap_mean.item() != before["gap_mean"].item()


def test_reward_module_refuses_predict():
    with pytest.raises(UserError, match="no predict"):
        RewardLightningModule(TINY_LLAMA).predict_step({}, 0)


# ---- prompts --------------------------------------------------------------------------------------------------------


def test_prompt_files_tokenize_as_training_prompts(tmp_path, tiny_llama):
    from tests.test_tokenize import TEMPLATE

    tok = load_tokenizer(tiny_llama)
    raw = load_files(PAIRS_VAL)
    expected, _ = tokenize_dataset(raw, tok, max_length=64, max_prompt_length=12)
    got, stats = tokenize_prompts(load_files(PAIRS_VAL, prompts_only=True), tok, max_prompt_length=12)
    assert got["prompt_ids"] == expected["prompt_ids"] and got["prompt"] == raw.dataset["prompt"]
    assert stats.prompts_truncated > 0  # truncation (end kept, BOS first) is training's
    chat = copy.deepcopy(tok)
    chat.chat_template = TEMPLATE
    messages = [[{"role": "user", "content": "Best film?"}], [{"role": "user", "content": "Worst one?"}]]
    pairs = datasets.Dataset.from_dict(
        {
            "prompt": messages,
            "chosen": [[{"role": "assistant", "content": "Heat."}]] * 2,
            "rejected": [[{"role": "assistant", "content": "None."}]] * 2,
        }
    )
    from madpo.data.formats import validate, validate_prompts

    expected, _ = tokenize_dataset(validate(pairs, "x"), chat, max_length=64)
    prompts = validate_prompts(datasets.Dataset.from_dict({"prompt": messages}), "x")
    got, _ = tokenize_prompts(prompts, chat)
    assert prompts.conversational and got["prompt_ids"] == expected["prompt_ids"]
    assert chat.decode(got["prompt_ids"][0]) == "<|bos|>user: Best film?<|eos|><|bos|>assistant:"
    with pytest.raises(ValueError, match="chat template"):
        tokenize_prompts(prompts, tok)
    with pytest.raises(UserError, match="no 'prompt' column"):
        validate_prompts(datasets.Dataset.from_dict({"text": ["a"]}), "x.jsonl")


def test_merge_puts_every_rank_back_in_prompt_order_once():
    rank0 = [{"index": i, "r": 0} for i in (0, 2, 4)]
    rank1 = [{"index": i, "r": 1} for i in (1, 3, 0)]  # a padding sampler repeats row 0
    merged = merge_predictions([rank0, rank1])
    assert [r["index"] for r in merged] == [0, 1, 2, 3, 4] and merged[0]["r"] == 0


def test_generation_options_are_checked_and_documented(capsys):
    with pytest.raises(ValueError, match="top_p"):
        GenerationOptions(top_p=0.0)
    with pytest.raises(SystemExit):
        cli_main(["predict", "--model.help", "madpo.PolicyLightningModule"])
    out = capsys.readouterr().out
    assert "--model.generation.max_new_tokens" in out and "Most tokens sampled per completion" in out


# ---- predict --------------------------------------------------------------------------------------------------------

MAX_NEW = 12


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, dpo_ckpt, random_reward_model) -> tuple[list[dict], str, str]:
    """`cli.py predict` on the preference file pairs_val.jsonl (its prompts), from the trained checkpoint, with a
    reward model: (rows, stdout, log_dir)."""
    tmp = tmp_path_factory.mktemp("predict")
    args = _args(
        "predict",
        "dpo.yaml",
        tmp,
        f"--ckpt_path={dpo_ckpt}",
        f"--data.predict_files={PAIRS_VAL}",
        f"--data.reward_model={random_reward_model}",
        f"--model.init_args.generation.max_new_tokens={MAX_NEW}",
        "--data.eval_batch_size=16",
        name="predict",
    )
    proc = run_cli_subprocess(args)
    log_dir = tmp / "runs" / "predict" / "version_0"
    return _jsonl(log_dir / "predictions.jsonl"), proc.stdout, str(log_dir)


def test_predict_writes_one_row_per_prompt_in_order(predicted):
    rows, _, _ = predicted
    prompts = [r["prompt"] for r in _jsonl(PAIRS_VAL)]
    assert [r["index"] for r in rows] == list(range(len(prompts))) and [r["prompt"] for r in rows] == prompts
    for r in rows:
        assert 1 <= r["n_tokens"] == len(r["completion_ids"]) <= MAX_NEW
        assert all(math.isfinite(r[k]) for k in ("policy_logp", "reference_logp", "reward"))
        assert r["policy_logp"] < 0 and r["log_ratio"] == r["policy_logp"] - r["reference_logp"]
        assert isinstance(r["completion"], str) and r["eos"] == (r["completion_ids"][-1] == 2)
    # the checkpoint, not the initial model, sampled and scored: the reference (the initial model) differs from it
    assert sum(abs(r["log_ratio"]) > 1e-3 for r in rows) > len(rows) // 2
    assert len({r["reward"] for r in rows}) > 1
    assert max(r["n_tokens"] for r in rows) == MAX_NEW  # the command line's max_new_tokens, not the default 64


def test_predict_prints_the_means_of_the_rows(predicted):
    import numpy as np

    rows, stdout, log_dir = predicted
    assert f"n={len(rows)} completions written to {log_dir}/predictions.jsonl" in stdout
    kl = re.search(r"KL\(policy‖reference\): (\S+) ± (\S+) \(SE\)", stdout)
    reward = re.search(r"reward model score: (\S+) ± (\S+) \(SE\)", stdout)
    assert kl and reward, stdout[-2000:]
    for match, key in ((kl, "log_ratio"), (reward, "reward")):
        values = np.array([r[key] for r in rows], dtype=np.float64)
        assert float(match.group(1)) == pytest.approx(values.mean(), abs=1e-6)  # printed with 6 decimals
        assert float(match.group(2)) == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)), abs=1e-6)


def test_predicted_logps_and_rewards_match_a_recomputation(predicted, dpo_ckpt, random_reward_model, tmp_path):
    rows, _, _ = predicted
    policy = PolicyLightningModule(TINY_LLAMA, loss=DPOLoss())
    policy.load_state_dict(torch.load(dpo_ckpt, weights_only=True)["state_dict"])
    reference, reward_model = load_causal_lm(TINY_LLAMA), load_reward_model(random_reward_model)
    dm = PreferenceDataModule(predict_files=PAIRS_VAL, tokenizer=TINY_LLAMA, max_length=64, max_prompt_length=16)
    dm.setup("predict")  # the prompt ids as predict tokenized them (the same DataModule settings as the config)
    prompt_ids = dm.predict_dataset["prompt_ids"]
    for model in (policy.model, reference, reward_model):
        model.eval()
    for r in rows[::4]:
        ids = torch.tensor([prompt_ids[r["index"]] + r["completion_ids"]])
        mask = torch.ones_like(ids)
        completion = torch.zeros_like(ids, dtype=torch.bool)
        completion[0, len(prompt_ids[r["index"]]) :] = True
        with torch.no_grad():
            logp, n = sequence_logps(policy.model, ids, mask, completion)
            ref_logp, _ = sequence_logps(reference, ids, mask, completion)
            reward = pair_rewards(reward_model, ids, mask)
        # The same weights and tokens; predict ran them in a padded batch of 16 in another process (other thread
        # count), so only float32 reduction order differs: ~1e-7 relative per op, ~1e-5 on a sum of ~-100 nats.
        assert int(n) == r["n_tokens"]
        assert float(logp) == pytest.approx(r["policy_logp"], rel=1e-5, abs=1e-4)
        assert float(ref_logp) == pytest.approx(r["reference_logp"], rel=1e-5, abs=1e-4)
        assert float(reward) == pytest.approx(r["reward"], rel=1e-5, abs=1e-5)


def _predict_in_process(tmp_path, name: str, *extra: str) -> tuple[list[dict], PredictionWriter]:
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("I loved", "The plot", "Why", "It")])
    out = tmp_path / f"{name}.jsonl"
    cli = cli_main(
        _args(
            "predict",
            "dpo.yaml",
            tmp_path,
            f"--data.predict_files={prompts}",
            f"--predictions.path={out}",
            "--data.eval_batch_size=3",
            "--model.init_args.generation.max_new_tokens=8",
            *extra,
            name=name,
        )
    )
    return _jsonl(out), _writer(cli)


def test_fixed_seed_gives_the_same_completions(tmp_path):
    first, writer = _predict_in_process(tmp_path, "a", "--model.init_args.generation.seed=7")
    again, _ = _predict_in_process(tmp_path, "b", "--model.init_args.generation.seed=7")
    other, _ = _predict_in_process(tmp_path, "c", "--model.init_args.generation.seed=8")
    assert len(first) == 4 and writer.output_path == str(tmp_path / "a.jsonl")
    assert [r["completion_ids"] for r in again] == [r["completion_ids"] for r in first]
    assert [r["completion"] for r in again] == [r["completion"] for r in first]
    assert [r["completion_ids"] for r in other] != [r["completion_ids"] for r in first]
    # no checkpoint: the policy is the initial model, i.e. the reference, so every log-ratio is exactly 0
    assert writer.summary["kl"]["mean"] == 0.0 and writer.summary["reward"] is None
    assert all(r["log_ratio"] == 0.0 and "reward" not in r for r in first)


def test_predict_reads_conversational_prompts_with_the_chat_template(tmp_path):
    from tests.test_tokenize import TEMPLATE

    model_dir = tmp_path / "chat-llama"
    shutil.copytree(TINY_LLAMA, model_dir)
    tok = load_tokenizer(str(model_dir))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    messages = [[{"role": "user", "content": "Best film?"}], [{"role": "user", "content": "And the worst?"}]]
    prompts = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": m} for m in messages])
    out = tmp_path / "chat-out.jsonl"
    cli_main(
        _args(
            "predict",
            "dpo.yaml",
            tmp_path,
            f"--model.init_args.model_name_or_path={model_dir}",
            f"--data.predict_files={prompts}",
            f"--predictions.path={out}",
            "--model.init_args.generation.max_new_tokens=4",
        )
    )
    rows = _jsonl(out)
    assert [r["prompt"] for r in rows] == messages and all(1 <= r["n_tokens"] <= 4 for r in rows)


@pytest.mark.slow
def test_ddp_predict_writes_one_file_equal_to_one_process(tmp_path):
    """2 CPU processes (gloo) each sample every other prompt; rank 0 writes one file in prompt order. With
    eval_batch_size 1 each prompt is sampled alone with seed + its index, so the completions equal one process's."""
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", _jsonl(PAIRS_VAL)[:7])  # 4 prompts on rank 0, 3 on rank 1
    common = (
        f"--data.predict_files={prompts}",
        "--data.eval_batch_size=1",
        "--model.init_args.generation.max_new_tokens=6",
    )
    single = _jsonl(_writer(cli_main(_args("predict", "dpo.yaml", tmp_path, *common, name="one"))).output_path)
    ddp_args = _args("predict", "dpo.yaml", tmp_path, *common, name="ddp")
    run_cli_subprocess([*ddp_args, "--trainer", str(REPO / "configs/trainer/ddp_cpu.yaml")])
    (path,) = list((tmp_path / "runs" / "ddp").glob("version_*/predictions.jsonl"))
    ddp = _jsonl(path)
    assert [r["index"] for r in ddp] == [r["index"] for r in single] == list(range(7))
    assert [r["completion_ids"] for r in ddp] == [r["completion_ids"] for r in single]
    for a, b in zip(ddp, single, strict=True):
        assert a["policy_logp"] == pytest.approx(b["policy_logp"], rel=1e-5, abs=1e-4)
