import pytest
import torch

from madpo.modeling import load_causal_lm, load_tokenizer
from madpo.pipeline.generate import (
    encode_prompt,
    prompt_prefix,
    sample_continuation_ids,
    sample_continuations,
    split_review,
)

REVIEW = (
    "I rented I AM CURIOUS-YELLOW from my video store because of all the controversy that surrounded it "
    "when it was first released in 1967."
)


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_causal_lm(tiny_llama), load_tokenizer(tiny_llama)


PROMPTS = ["This movie was", "I really hated every single minute of this film, and", "A"]


def test_sampling_is_seeded_and_returns_num_samples(lm):
    model, tok = lm
    kw = dict(num_samples=3, max_new_tokens=12, batch_size=2, seed=0, progress=False)
    a = sample_continuations(model, tok, PROMPTS, **kw)
    b = sample_continuations(model, tok, PROMPTS, **kw)
    c = sample_continuations(model, tok, PROMPTS, **{**kw, "seed": 1})
    assert a == b and a != c
    assert len(a) == len(PROMPTS) and all(len(s) == 3 for s in a)
    assert all(isinstance(t, str) for s in a for t in s)
    assert len({t for s in a for t in s}) > 1  # really sampled


def test_continuation_ids_exclude_prompt_and_specials(lm):
    model, tok = lm
    ids, stats = sample_continuation_ids(
        model, tok, PROMPTS, num_samples=2, max_new_tokens=10, batch_size=3, seed=0, progress=False
    )
    texts = sample_continuations(
        model, tok, PROMPTS, num_samples=2, max_new_tokens=10, batch_size=3, seed=0, progress=False
    )
    specials = {tok.pad_token_id, tok.bos_token_id}
    for per_prompt, per_text in zip(ids, texts, strict=True):
        for seq, text in zip(per_prompt, per_text, strict=True):
            assert 1 <= len(seq) <= 10
            assert not specials & set(seq)
            assert tok.eos_token_id not in seq[:-1]  # EOS only as the last token, if at all
            assert text == tok.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert stats["n_sequences"] == 6 and stats["n_tokens"] == sum(len(s) for p in ids for s in p)


def test_left_padding_gives_the_same_continuation_as_alone(lm):
    # top_k=1 makes sampling greedy: the short prompt must continue identically alone and batched with a longer one
    model, tok = lm
    kw = dict(num_samples=1, max_new_tokens=8, seed=0, top_k=1, progress=False)
    alone = sample_continuations(model, tok, ["A"], batch_size=1, **kw)[0]
    batched = sample_continuations(model, tok, [PROMPTS[1], "A"], batch_size=2, **kw)[1]
    assert alone == batched


def test_sampling_leaves_tokenizer_model_and_rng_alone(lm):
    model, tok = lm
    model.train()
    side = tok.padding_side
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample_continuations(model, tok, PROMPTS[:1], num_samples=1, max_new_tokens=4, batch_size=1, seed=5, progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert tok.padding_side == side and model.training
    model.eval()


def test_prompt_too_long_for_the_model_is_refused(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="prompt 1 .*max_position_embeddings=256"):
        sample_continuations(
            model, tok, ["a", "word " * 300], num_samples=1, max_new_tokens=4, batch_size=2, seed=0, progress=False
        )


def test_encode_prompt_bos_once():
    class Tok:  # a tokenizer that adds BOS itself when asked
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            ids = [10 + len(w) for w in text.split()]
            return {"input_ids": ([1] if add_special_tokens else []) + ids}

    assert encode_prompt(Tok(), "ab c") == [1, 12, 11]
    Tok.bos_token_id = None
    assert encode_prompt(Tok(), "ab c") == [12, 11]


def test_encode_prompt_tiny_llama(lm):
    _, tok = lm
    ids = encode_prompt(tok, "This movie")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[1:] == tok("This movie", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, tok.bos_token + "This movie") == ids  # a text that starts with BOS keeps just one


def test_prompt_prefix_and_split_review(lm):
    _, tok = lm
    full = tok(REVIEW, add_special_tokens=False)["input_ids"]
    prefix = prompt_prefix(REVIEW, tok, 20)
    assert REVIEW.startswith(prefix) and prefix != REVIEW
    assert tok(prefix, add_special_tokens=False)["input_ids"] == full[:20]
    prompt, rest = split_review(REVIEW, tok, 20, 5)
    assert prompt == prefix
    assert rest == tok.decode(full[20:25])
    assert REVIEW.startswith(prompt + rest)
    assert prompt_prefix("short", tok, 20) == "short"


def test_none_keeps_the_models_generation_config(lm):
    import copy

    model, tok = lm
    greedy = copy.deepcopy(model)
    greedy.generation_config.top_k = 1  # the model's own default: greedy
    kw = dict(num_samples=2, max_new_tokens=6, batch_size=3, progress=False)
    a = sample_continuations(greedy, tok, PROMPTS, seed=0, top_k=None, **kw)
    b = sample_continuations(greedy, tok, PROMPTS, seed=1, top_k=None, **kw)
    assert a == b and all(s[0] == s[1] for s in a)  # the config's top_k=1 was used
    assert sample_continuations(greedy, tok, PROMPTS, seed=0, **kw) != a  # explicit top_k=0 overrides it


def test_generation_config_eos_list_ends_samples(lm):
    import copy

    model, tok = lm
    kw = dict(num_samples=1, max_new_tokens=6, batch_size=1, seed=0, top_k=1, progress=False)
    (greedy,), _ = sample_continuation_ids(model, tok, ["A"], **kw)
    assert len(greedy[0]) == 6
    stopper = copy.deepcopy(model)
    stop = greedy[0][-1]
    stopper.generation_config.eos_token_id = [tok.eos_token_id, stop]  # a greedy token now ends generation
    (cut,), stats = sample_continuation_ids(stopper, tok, ["A"], **kw)
    assert cut[0] == greedy[0][: greedy[0].index(stop) + 1] and stats["n_eos"] == 1
