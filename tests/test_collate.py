"""madpo.data.collate: the batch of docs/contracts.md (2B stacked rows, right padding, completion_mask)."""

from pathlib import Path

import datasets
import pytest
import torch

from madpo.data.collate import PreferenceCollator
from madpo.data.formats import load_in_memory
from madpo.data.tokenize import tokenize_dataset
from madpo.modeling import load_tokenizer

TINY = str(Path(__file__).parent / "data" / "tiny-llama")
PAD = 0


def features():
    return [
        {
            "index": 7,
            "prompt_ids": [1, 10, 11],
            "chosen_ids": [20, 2],
            "rejected_ids": [30, 31, 32, 2],
            "rm_margin": 1.5,
        },
        {"index": 3, "prompt_ids": [1, 12], "chosen_ids": [21, 22, 23, 24, 2], "rejected_ids": [33], "rm_margin": -2.0},
    ]


def test_pair_batch_layout():
    batch = PreferenceCollator(PAD)(features())
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "index", "rm_margin"}
    expected = torch.tensor(
        [
            [1, 10, 11, 20, 2, 0, 0],  # row 0: prompt 0 + chosen 0
            [1, 12, 21, 22, 23, 24, 2],  # row 1: prompt 1 + chosen 1
            [1, 10, 11, 30, 31, 32, 2],  # row B + 0: prompt 0 + rejected 0
            [1, 12, 33, 0, 0, 0, 0],  # row B + 1: prompt 1 + rejected 1
        ]
    )
    assert torch.equal(batch["input_ids"], expected) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 5 + [0] * 2, [1] * 7, [1] * 7, [1] * 3 + [0] * 4]))
    assert batch["completion_mask"].dtype == torch.bool
    assert batch["completion_mask"].tolist() == [
        [False] * 3 + [True] * 2 + [False] * 2,
        [False] * 2 + [True] * 5,
        [False] * 3 + [True] * 4,
        [False] * 2 + [True] + [False] * 4,
    ]
    assert batch["index"].tolist() == [7, 3] and batch["index"].dtype == torch.long
    assert batch["rm_margin"].dtype == torch.float32 and batch["rm_margin"].tolist() == [1.5, -2.0]


def test_sft_rows_give_b_rows_and_optional_float_columns():
    feats = [{k: v for k, v in f.items() if k not in ("rejected_ids", "rm_margin")} for f in features()]
    for f, (c, r) in zip(feats, [(-1.0, -2.0), (-3.0, -4.5)], strict=True):
        f["ref_chosen_logps"], f["ref_rejected_logps"] = c, r
    batch = PreferenceCollator(PAD)(feats)
    assert batch["input_ids"].shape == (2, 7) and "rm_margin" not in batch
    assert batch["completion_mask"].sum(1).tolist() == [2, 5]
    assert batch["ref_chosen_logps"].dtype == torch.float32 and batch["ref_rejected_logps"].tolist() == [-2.0, -4.5]


def test_pad_to_multiple_of_and_tensor_inputs():
    feats = [{k: torch.tensor(v) if k.endswith("_ids") else v for k, v in f.items()} for f in features()]
    batch = PreferenceCollator(PAD, pad_to_multiple_of=8)(feats)
    assert batch["input_ids"].shape == (4, 8)
    assert torch.equal(batch["input_ids"][:, :7], PreferenceCollator(PAD)(features())["input_ids"])
    assert (batch["input_ids"][:, 7] == PAD).all() and not batch["attention_mask"][:, 7].any()
    assert PreferenceCollator(PAD, pad_to_multiple_of=7)(features())["input_ids"].shape[1] == 7


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty batch"):
        PreferenceCollator(PAD)([])
    with pytest.raises(ValueError, match="pad_token_id"):
        PreferenceCollator(None)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PreferenceCollator(PAD, pad_to_multiple_of=0)


def test_completion_mask_marks_exactly_the_completion_text():
    tok = load_tokenizer(TINY)
    rows = [
        {"prompt": "I liked", "chosen": " the acting a lot.", "rejected": " nothing."},
        {"prompt": "This was a long and winding film", "chosen": " worth it.", "rejected": " a total waste of time."},
    ]
    ds, _ = tokenize_dataset(load_in_memory(datasets.Dataset.from_list(rows)), tok, max_length=64)
    batch = PreferenceCollator(tok.pad_token_id, pad_to_multiple_of=8)(list(ds))
    B = len(rows)
    for r in range(2 * B):
        row = rows[r % B]
        text = row["chosen"] if r < B else row["rejected"]
        ids, mask = batch["input_ids"][r], batch["completion_mask"][r]
        assert tok.decode(ids[mask]) == text + "<|eos|>"
        prompt = ids[batch["attention_mask"][r].bool() & ~mask]
        assert tok.decode(prompt) == "<|bos|>" + row["prompt"]
        assert (ids[~batch["attention_mask"][r].bool()] == tok.pad_token_id).all()
