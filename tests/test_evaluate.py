import copy
import json
import math

import numpy as np
import pytest
import torch

from madpo.modeling import load_causal_lm, load_tokenizer
from madpo.pipeline.evaluate import (
    evaluate_policy,
    kl_estimate,
    log_to_tensorboard,
    per_sequence_log_ratio,
    reward_summary,
    write_results,
)
from madpo.pipeline.generate import encode_prompt, sample_continuation_ids
from madpo.pipeline.oracle import BaseOracle


def test_reward_summary_hand_values():
    s = reward_summary(np.array([1.0, 2.0, 3.0, 4.0]))
    sd = math.sqrt(5 / 3)  # Σ(x−2.5)² = 5, ddof 1
    se = sd / 2
    assert s["n"] == 4 and s["mean"] == 2.5
    assert s["sd"] == pytest.approx(sd, abs=1e-12) and s["se"] == pytest.approx(se, abs=1e-12)
    assert s["ci95_low"] == pytest.approx(2.5 - 1.96 * se, abs=1e-12)
    assert s["ci95_high"] == pytest.approx(2.5 + 1.96 * se, abs=1e-12)
    # the paper's IPO High cell: SD 2.109 over n = 2000 → SE ≈ 0.047
    x = np.random.default_rng(0).normal(0.35, 2.109, 2000)
    assert reward_summary(x)["se"] == pytest.approx(x.std(ddof=1) / math.sqrt(2000))
    assert reward_summary(x)["se"] == pytest.approx(0.047, abs=0.002)


def test_reward_summary_edge_cases():
    assert reward_summary([0.5]) == {"n": 1, "mean": 0.5, "sd": None, "se": None, "ci95_low": None, "ci95_high": None}
    with pytest.raises(ValueError, match="no values"):
        reward_summary([])
    with pytest.raises(ValueError, match="row 1"):
        reward_summary([0.0, float("nan")])


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_causal_lm(tiny_llama), load_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def other_model(lm):
    model, _ = lm
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return other


PROMPTS = ["This movie was", "I hated it because", "The acting", "Worst film ever, the plot", "My kids"] * 4


def test_log_ratio_matches_a_hand_computation(lm, other_model):
    model, tok = lm
    prompt, cont = "This movie was", [40, 41, 42, tok.eos_token_id]
    ratio, counts = per_sequence_log_ratio(model, other_model, tok, [prompt, "A"], [cont, [50, 51]], batch_size=2)
    ids = torch.tensor([encode_prompt(tok, prompt) + cont])
    n_prompt = len(encode_prompt(tok, prompt))

    def logp(m):
        with torch.no_grad():
            logits = m(input_ids=ids).logits[0].double().log_softmax(-1)
        return sum(logits[t - 1, ids[0, t]].item() for t in range(n_prompt, ids.shape[1]))

    assert counts.tolist() == [4, 2]
    assert ratio[0] == pytest.approx(logp(model) - logp(other_model), abs=1e-4)


def test_kl_is_zero_for_identical_models_and_positive_otherwise(lm, other_model):
    model, tok = lm
    ids, _ = sample_continuation_ids(
        model, tok, PROMPTS, num_samples=1, max_new_tokens=16, batch_size=8, seed=0, progress=False
    )
    samples = [s[0] for s in ids]
    same = kl_estimate(model, copy.deepcopy(model), tok, PROMPTS, samples, batch_size=8)
    assert same["n"] == len(PROMPTS) and abs(same["mean"]) < 1e-4 and same["se"] < 1e-4
    differ = kl_estimate(model, other_model, tok, PROMPTS, samples, batch_size=8)
    assert differ["mean"] > 3 * differ["se"] > 0
    assert differ["mean_tokens"] > 1
    # decoded strings take the same path when they re-tokenize to the same ids
    texts = [tok.decode(s, skip_special_tokens=True) for s in samples]
    retok = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert kl_estimate(model, other_model, tok, PROMPTS, texts)["mean"] == pytest.approx(
        kl_estimate(model, other_model, tok, PROMPTS, retok)["mean"], abs=1e-5
    )


class LengthOracle(BaseOracle):
    """Deterministic stand-in: longer texts score higher, within [−3, 3]."""

    name = "length"

    def _score(self, texts):
        return np.clip(np.array([len(t) / 20.0 - 3.0 for t in texts]), -3, 3)


def test_evaluate_policy_and_outputs(lm, other_model, tmp_path):
    model, tok = lm
    kw = dict(max_new_tokens=12, batch_size=8, seed=3, n_examples=3, progress=False)
    res = evaluate_policy(model, other_model, tok, LengthOracle(), PROMPTS, **kw)
    again = evaluate_policy(model, other_model, tok, LengthOracle(), PROMPTS, **kw)
    assert res["reward"] == again["reward"] and res["examples"] == again["examples"] and res["kl"] == again["kl"]
    assert res["reward"]["n"] == len(PROMPTS) and -3 <= res["reward"]["mean"] <= 3
    assert res["kl"]["n"] == len(PROMPTS) and res["kl"]["mean"] > 0
    assert len(res["examples"]) == 3 and res["examples"][0]["prompt"] == PROMPTS[0]
    ex = res["examples"][0]
    assert ex["reward"] == pytest.approx(LengthOracle().score([ex["prompt"] + ex["continuation"]])[0])
    assert res["oracle"]["name"] == "length" and res["generation"]["seed"] == 3
    assert evaluate_policy(model, None, tok, LengthOracle(), PROMPTS[:2], **kw)["kl"] is None

    res["method"] = "dpo"
    res["nan_value"] = float("nan")
    json_path, md_path = write_results(res, tmp_path / "out")
    loaded = json.loads(json_path.read_text())
    assert loaded["reward"]["mean"] == pytest.approx(res["reward"]["mean"]) and loaded["nan_value"] is None
    md = md_path.read_text()
    assert f"{res['reward']['mean']:.3f} ± {res['reward']['se']:.3f}" in md
    assert "KL(policy‖reference)" in md and "| method | dpo |" in md
    assert md.count("\n| ") >= 3 + 5


def test_nan_oracle_stops_evaluation(lm):
    model, tok = lm

    class NanOracle(BaseOracle):
        name = "broken"

        def _score(self, texts):
            return np.where(np.arange(len(texts)) == 2, np.nan, 0.0)

    with pytest.raises(ValueError, match="oracle 'broken'.*row 2"):
        evaluate_policy(
            model, None, tok, NanOracle(), PROMPTS[:4], max_new_tokens=4, batch_size=4, seed=0, progress=False
        )


def test_log_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = {
        "reward": reward_summary([1.0, 2.0, 3.0]),
        "kl": {"n": 3, "mean": 0.25, "se": 0.05, "sd": 0.1, "mean_tokens": 10.0},
        "oracle": {"name": "tfidf", "heldout_accuracy": 0.9},
        "examples": [{"prompt": "This movie", "continuation": " was | great", "reward": 2.5}],
    }
    log_to_tensorboard(results, tmp_path, step=7)
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    scalar_tags = set(acc.Tags()["scalars"])
    assert {"eval/reward_mean", "eval/reward_se", "eval/kl_mean", "eval/oracle_heldout_accuracy"} <= scalar_tags
    (event,) = acc.Scalars("eval/reward_mean")
    assert event.step == 7 and event.value == pytest.approx(2.0)
    assert "eval/examples/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("eval/examples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "This movie" in text and "was \\| great" in text
