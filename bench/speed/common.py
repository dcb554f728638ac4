"""The shared work of bench/throughput.py: its configuration, result record, the tiny model, the tokenised pairs and
their one training order, prepared once in a work directory that every contender reads."""

from __future__ import annotations

import json
import resource
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONTENDERS = ("trl_default", "trl_precompute", "madpo", "madpo_grouped", "plain")
BASELINE = "madpo_baseline"  # madpo from another source tree (--baseline-src): before/after a change, side by side
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class BenchConfig:
    """Everything that defines the work (shared by every contender)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    vocab_size: int = 8192
    tokenizer_reviews: int = 6000
    n_pairs: int = 512
    batch_size: int = 8
    max_length: int = 128
    max_prompt_length: int = 64
    warmup_steps: int = 5
    steps: int = 35
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    beta: float = 0.1
    seed: int = 0
    scoring_batch_size: int = 32

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def loss_window(self) -> int:
        """Steps averaged into the reported loss: TRL's default logging interval (10) when it divides the run."""
        return 10 if self.total_steps % 10 == 0 else self.total_steps

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=128,
            vocab_size=1024,
            tokenizer_reviews=400,
            n_pairs=32,
            batch_size=4,
            max_length=64,
            max_prompt_length=24,
            warmup_steps=1,
            steps=2,
            lr=1e-3,
        )


@dataclass
class Result:
    """What one contender's worker measured."""

    contender: str
    pairs_per_s: float
    step_s: float
    timed_s: float
    precompute_s: float
    setup_s: float
    total_s: float
    peak_rss_mb: float
    loss: float
    losses: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------------
# The shared work: model, tokenizer, pairs, order
# ----------------------------------------------------------------------------------------------------------------------


def make_pairs(cfg: BenchConfig, tokenizer: Any, texts: list[str], labels: list[int]) -> list[dict[str, Any]]:
    """`cfg.n_pairs` IMDB-derived pairs: prompt = the first words of a review (after BOS), chosen = a continuation
    taken from a positive review, rejected = one from a negative review; each prompt+completion fits `max_length`
    (BOS and EOS included), and tokenising prompt+completion as one string gives the same ids as tokenising them
    separately (so TRL's and madpo's tokenisations agree)."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    pos = [t for t, lab in zip(texts, labels, strict=True) if lab == 1]
    neg = [t for t, lab in zip(texts, labels, strict=True) if lab == 0]
    bos, eos = tokenizer.bos_token, tokenizer.eos_token

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pairs: list[dict[str, Any]] = []
    i = 0
    while len(pairs) < cfg.n_pairs:
        source = (neg if i % 2 else pos)[i // 2]
        prompt = bos + " ".join(source.split()[: int(rng.integers(4, 13))])
        budget = cfg.max_length - len(ids(prompt)) - 1  # room for the completion and its EOS
        completions = []
        for pool, offset in ((pos, 5000), (neg, 5000)):
            words = pool[offset + i].split()[int(rng.integers(0, 10)) :]
            words = words[: int(rng.integers(8, 90))]
            while words and len(ids(" " + " ".join(words))) > budget:
                words = words[: len(words) * 9 // 10]  # drop the last tenth until it fits
            completions.append(" " + " ".join(words))
        i += 1
        chosen, rejected = completions
        if chosen.strip() == "" or rejected.strip() == "" or chosen == rejected:
            continue
        p = ids(prompt)
        if len(p) >= cfg.max_prompt_length:
            continue
        c, r = ids(chosen) + ids(eos), ids(rejected) + ids(eos)
        if ids(prompt + chosen + eos) != p + c or ids(prompt + rejected + eos) != p + r:
            continue  # a token merges across the boundary: skip rather than let the tokenisations differ
        if len(p) + max(len(c), len(r)) > cfg.max_length:
            continue
        pairs.append(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected, "n_tokens": len(p) * 2 + len(c) + len(r)}
        )
    return pairs


def training_order(cfg: BenchConfig, n: int) -> list[int]:
    """The pair order of madpo's first epoch: `DistributedSampler(shuffle=True, seed=cfg.seed)` at epoch 0."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(cfg.seed + 0)
    return torch.randperm(n, generator=generator).tolist()


def prepare(workdir: Path, cfg: BenchConfig) -> dict[str, Any]:
    """Train the tokenizer, build and save the model once, write the pairs. Returns a description of the work."""
    from madpo.modeling import build_causal_lm, train_bpe_tokenizer
    from madpo.pipeline.reviews import load_imdb_reviews

    reviews = load_imdb_reviews()
    texts, labels = list(reviews["text"]), list(reviews["label"])
    half = len(texts) // 2
    k = cfg.tokenizer_reviews // 2
    model_dir = workdir / "model"
    tokenizer = train_bpe_tokenizer(texts[:k] + texts[half : half + k], model_dir, vocab_size=cfg.vocab_size)
    model = build_causal_lm(
        tokenizer,
        seed=cfg.seed,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(256, cfg.max_length),
        tie_word_embeddings=False,
    )
    model.save_pretrained(model_dir)
    pairs = make_pairs(cfg, tokenizer, texts, labels)
    order = training_order(cfg, len(pairs))
    with open(workdir / "pairs.jsonl", "w") as f:
        for row in pairs:
            f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    (workdir / "order.json").write_text(json.dumps(order))
    n_tokens = [row["n_tokens"] for row in pairs]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "pairs": len(pairs),
        "mean_tokens_per_pair": statistics.mean(n_tokens),
    }


def _load_config(workdir: Path) -> BenchConfig:
    raw = json.loads((workdir / "config.json").read_text())
    raw["betas"] = tuple(raw["betas"])
    return BenchConfig(**{f.name: raw[f.name] for f in fields(BenchConfig)})


def _load_pairs(workdir: Path, ordered: bool) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    if not ordered:
        return rows
    return [rows[i] for i in json.loads((workdir / "order.json").read_text())]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _result(
    contender: str,
    cfg: BenchConfig,
    marks: list[float],
    losses: list[float],
    precompute_s: float,
    t0: float,
    t_first: float,
) -> Result:
    if len(marks) < cfg.total_steps:
        raise RuntimeError(f"{contender}: {len(marks)} step marks, expected {cfg.total_steps}")
    # marks[i] = end of step i; the timed window runs from the end of the last warm-up step to the end of the last step
    timed = marks[cfg.total_steps - 1] - (marks[cfg.warmup_steps - 1] if cfg.warmup_steps else t_first)
    window = losses[-cfg.loss_window :] if losses else []
    return Result(
        contender=contender,
        pairs_per_s=cfg.steps * cfg.batch_size / timed,
        step_s=timed / cfg.steps,
        timed_s=timed,
        precompute_s=precompute_s,
        setup_s=t_first - t0,
        total_s=marks[-1] - t0,
        peak_rss_mb=_peak_rss_mb(),
        loss=statistics.mean(window) if window else float("nan"),
        losses=losses,
    )
