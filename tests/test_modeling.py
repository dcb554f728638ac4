import torch

from madpo.modeling import (
    init_reward_model,
    last_token_index,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    pair_rewards,
    sequence_logps,
    state_fingerprint,
    tokenizer_fingerprint,
)


def _batch(tokenizer, texts, prompt_lens, padding_side="right"):
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    completion = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, (row, p) in enumerate(zip(ids, prompt_lens, strict=True)):
        start = 0 if padding_side == "right" else width - len(row)
        input_ids[i, start : start + len(row)] = torch.tensor(row)
        attention[i, start : start + len(row)] = 1
        completion[i, start + p : start + len(row)] = True
    return input_ids, attention, completion


def _reference_logps(model, input_ids, attention, completion):
    """The straightforward computation: full logits, log_softmax over the vocabulary, gather, sum."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * completion[:, 1:]).sum(1)


def test_sequence_logps_fast_path_equals_full_logits(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    model = load_causal_lm(tiny_llama).eval()
    texts = ["a good film with fine acting", "bad", "the plot was thin but the music carried it along well"]
    input_ids, attention, completion = _batch(tok, texts, prompt_lens=[2, 0, 4])
    completion[1, 0] = False  # the first token has no prediction
    fast, n_fast = sequence_logps(model, input_ids, attention, completion, fast=True)
    slow, n_slow = sequence_logps(model, input_ids, attention, completion, fast=False)
    expected = _reference_logps(model, input_ids, attention, completion)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slow, expected, rtol=1e-5, atol=1e-5)
    assert n_fast.tolist() == n_slow.tolist() == completion[:, 1:].sum(1).tolist()
    assert (fast < 0).all()


def test_sequence_logps_gradient_matches_full_logits(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    model = load_causal_lm(tiny_llama)
    input_ids, attention, completion = _batch(tok, ["one two three four", "five six seven"], prompt_lens=[1, 1])
    fast, _ = sequence_logps(model, input_ids, attention, completion)
    (g_fast,) = torch.autograd.grad(fast.sum(), [model.model.layers[0].mlp.up_proj.weight])
    slow = _reference_logps(model, input_ids, attention, completion)
    (g_slow,) = torch.autograd.grad(slow.sum(), [model.model.layers[0].mlp.up_proj.weight])
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-6)


def test_last_token_index_any_padding_side():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3]
    assert last_token_index(left).tolist() == [3, 3]


def test_pair_rewards_same_for_left_and_right_padding(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    torch.manual_seed(0)
    rm = init_reward_model(tiny_llama, pad_token_id=tok.pad_token_id).eval()
    texts = ["great movie", "a long and rather boring film about nothing"]
    r_right = pair_rewards(rm, *_batch(tok, texts, [0, 0], "right")[:2])
    # without padding, each text alone
    alone = torch.cat([pair_rewards(rm, *_batch(tok, [t], [0])[:2]) for t in texts])
    torch.testing.assert_close(r_right, alone, rtol=1e-5, atol=1e-5)
    assert r_right.dtype == torch.float32 and r_right.shape == (2,)


def test_load_reward_model_refuses_causal_lm(tiny_llama):
    import pytest

    with pytest.raises(ValueError, match="causal LM"):
        load_reward_model(tiny_llama)


def test_reward_dir_refused_as_causal_lm(tiny_llama, tmp_path):
    import pytest

    tok = load_tokenizer(tiny_llama)
    init_reward_model(tiny_llama, pad_token_id=tok.pad_token_id).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="reward"):
        load_causal_lm(str(tmp_path))
    assert load_reward_model(str(tmp_path)).config.num_labels == 1


def test_fingerprints_change_with_weights_and_vocab(tiny_llama):
    model = load_causal_lm(tiny_llama)
    before = state_fingerprint(model)
    assert state_fingerprint(load_causal_lm(tiny_llama)) == before
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    assert state_fingerprint(model) != before
    tok = load_tokenizer(tiny_llama)
    fp = tokenizer_fingerprint(tok)
    tok.add_tokens(["<|new|>"])
    assert tokenizer_fingerprint(tok) != fp


def test_reward_model_path_that_is_a_checkpoint_file_is_refused_with_guidance(tmp_path):
    import pytest

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="exports at the end of fit"):
        load_reward_model(str(ckpt))
    with pytest.raises(ValueError, match="does not exist"):
        load_reward_model(str(tmp_path / "missing" / "dir"))
