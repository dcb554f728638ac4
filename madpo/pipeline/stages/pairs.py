"""Stage 6, `pairs` <- reviews, oracle, sft: 2 samples per negative-review prompt, oracle scores, the three tiers,
Gumbel labels, train/eval split (docs/method.md §IMDB protocol, eq. (35)–(36)): `pairs/<tier>/{train,eval}.jsonl`
(TRL format + oracle columns) and a report."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import madpo.pipeline.stages.oracle as oracle_stage
from madpo.pipeline.config import TIER_NAMES, OracleConfig, PairsConfig
from madpo.pipeline.stages import training
from madpo.pipeline.stages.base import (
    Context,
    StageInputs,
    StageOutput,
    StageResult,
    check_prompt_lengths,
    device_for,
    read_jsonl,
    run_stage,
    say,
    write_json_atomic,
    write_jsonl,
)
from madpo.pipeline.stages.reviews import load_reviews, load_slices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairsInputs(StageInputs):
    """The pairs section, the prompt length, the oracle section (to load the oracle), the sampling device's
    accelerator, and the reviews, oracle and SFT model."""

    stage = "pairs"
    cfg: PairsConfig
    prompt_tokens: int
    oracle_cfg: OracleConfig
    accelerator: str
    reviews: StageResult
    oracle: StageResult
    sft: StageResult


def _score_column(oracle: Any, prompts: Sequence[str], continuations: Sequence[str], column: str) -> np.ndarray:
    from madpo.pipeline.oracle import checked_scores

    try:
        return checked_scores(oracle, [p + c for p, c in zip(prompts, continuations, strict=True)])
    except ValueError as e:
        raise ValueError(f"scoring prompt + {column} (row = prompt row): {e}") from e


def _composition(rows: Sequence[dict]) -> dict[str, int]:
    """How many pairs of each kind: 'sample vs sample' or 'sample vs original' (sources of the two texts)."""

    def kind(row: dict) -> str:
        sources = sorted(
            s.replace("sample1", "sample").replace("sample2", "sample")
            for s in (row["chosen_source"], row["rejected_source"])
        )
        return " vs ".join(sources)

    return dict(sorted(Counter(kind(r) for r in rows).items()))


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "sd": float(values.std()), "frac_positive": float((values > 0).mean())}


def sample_and_label_pairs(inputs: PairsInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.modeling import load_causal_lm, load_tokenizer
    from madpo.pipeline.generate import decode_continuation, sample_continuation_ids, split_review
    from madpo.pipeline.tiers import build_tiers, label_noise_stats, make_preference_splits

    cfg, prompt_tokens, device = inputs.cfg, inputs.prompt_tokens, device_for(inputs.accelerator)
    data, slices = load_reviews(inputs.reviews), load_slices(inputs.reviews)
    sft_path = inputs.sft.output("model")
    tok = load_tokenizer(sft_path)
    prompts, originals = [], []
    for text in slices.texts(data, "prompts"):
        prompt, original = split_review(text, tok, prompt_tokens, cfg.max_new_tokens)
        prompts.append(prompt)
        originals.append(original)
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt row {i} (review {slices.prompts[i]}) is empty")
    model = load_causal_lm(sft_path, pad_token_id=tok.pad_token_id).to(device)
    ids, gen_stats = sample_continuation_ids(
        model,
        tok,
        prompts,
        num_samples=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        device=device,
        progress=ctx.progress_bar,
        desc="sampling pairs",
    )
    del model
    sample1 = [decode_continuation(tok, s[0]) for s in ids]
    sample2 = [decode_continuation(tok, s[1]) for s in ids]
    say(f"pairs: sampled {gen_stats['n_sequences']} continuations at {gen_stats['tokens_per_s']} tokens/s")
    orc = oracle_stage.load_oracle(inputs.oracle, inputs.oracle_cfg, device)
    r1 = _score_column(orc, prompts, sample1, "sample1")
    r2 = _score_column(orc, prompts, sample2, "sample2")
    r_orig = _score_column(orc, prompts, originals, "original")
    write_jsonl(
        path / "samples.jsonl",
        [
            {
                "prompt_index": i,
                "review_row": slices.prompts[i],
                "prompt": p,
                "sample1": a,
                "sample2": b,
                "original": o,
                "oracle_sample1": x,
                "oracle_sample2": y,
                "oracle_original": z,
            }
            for i, (p, a, b, o, x, y, z) in enumerate(
                zip(prompts, sample1, sample2, originals, r1, r2, r_orig, strict=True)
            )
        ],
    )
    tiers = build_tiers(prompts, sample1, sample2, originals, r1, r2, r_orig)
    splits, report = make_preference_splits(
        tiers, n_eval=cfg.n_eval, n_train=cfg.n_train, shuffle_seed=cfg.shuffle_seed, label_seed=cfg.label_seed
    )
    outputs: dict[str, str] = {}
    for tier, parts in splits.items():
        for split, rows in parts.items():
            kept = [r for r in rows if r["chosen"].strip() and r["rejected"].strip()]
            empty = len(rows) - len(kept)
            if empty:
                log.warning("tier %s/%s: dropped %d pair(s) with an empty continuation", tier, split, empty)
            if not kept:
                raise ValueError(f"tier {tier}/{split}: no pairs left (all identical or empty)")
            write_jsonl(path / "pairs" / tier / f"{split}.jsonl", kept)
            outputs[f"{tier}/{split}"] = f"pairs/{tier}/{split}.jsonl"
            entry = report["tiers"][tier][split]
            entry["dropped_empty"] = empty
            entry.update({k: v for k, v in label_noise_stats(kept).items() if k != "n"})
            entry["n"] = len(kept)
            entry["composition"] = _composition(kept)
    # evaluation prompts: the held-out rows of the shuffle every tier shares (whatever was dropped per tier)
    n = len(prompts)
    order = np.random.default_rng(cfg.shuffle_seed).permutation(n)
    eval_rows = [int(i) for i in order[n - cfg.n_eval :]]
    for tier, parts in splits.items():
        if not {r["prompt_index"] for r in parts["eval"]} <= set(eval_rows):
            raise RuntimeError(f"tier {tier}: eval pairs outside the shared held-out prompts")
    write_jsonl(
        path / "eval_prompts.jsonl",
        [
            {"prompt_index": i, "prompt": prompts[i], "original": originals[i], "oracle_original": r_orig[i]}
            for i in eval_rows
        ],
    )
    outputs["eval_prompts"] = "eval_prompts.jsonl"
    outputs["samples"] = "samples.jsonl"
    identical = sum(a == b for a, b in zip(sample1, sample2, strict=True))
    report.update(
        {
            "generation": gen_stats,
            "oracle_scores": {"sample1": _summary(r1), "sample2": _summary(r2), "original": _summary(r_orig)},
            "identical_sample_pairs": int(identical),
            "empty_samples": int(sum(not s.strip() for s in sample1 + sample2)),
        }
    )
    write_json_atomic(path / "report.json", report)
    outputs["report"] = "report.json"
    for tier in TIER_NAMES:
        t = report["tiers"][tier]["train"]
        say(
            f"pairs: tier {tier}: {t['n']} train pairs {t['composition']}, labels disagree with the oracle on "
            f"{t['frac_disagree']:.1%}, mean |oracle gap| {t['mean_abs_oracle_gap']:.2f}"
        )
    return StageOutput(outputs, report)


def stage_pairs(ctx: Context, inputs: PairsInputs) -> StageResult:
    """Prompts (first `prompt_tokens` tokens of the negative prompt reviews) -> two samples each from the SFT model ->
    oracle scores of prompt + sample and of prompt + the original continuation (same token budget) -> the three
    tiers -> seeded shuffle, Gumbel-noise BT labels, train/eval split -> `pairs/<tier>/{train,eval}.jsonl`."""
    return run_stage(ctx, inputs, sample_and_label_pairs)


def load_pairs(pairs: StageResult, tier: str, split: str) -> list[dict]:
    return read_jsonl(pairs.output(f"{tier}/{split}"))


PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def pair_data(
    pairs: StageResult, tier: str, n_val: int | None, tokenizer: Any, max_prompt_length: int
) -> tuple[Any, Any, list[dict], int]:
    """A tier's (train, val) text-pair datasets (val: the first `n_val` eval pairs, None when empty), the training
    rows and the number of validation pairs; a prompt over the prompt budget stops it, naming the row."""
    train = load_pairs(pairs, tier, "train")
    val = load_pairs(pairs, tier, "eval")
    val = val[:n_val] if n_val is not None else val
    check_prompt_lengths([r["prompt"] for r in train], tokenizer, max_prompt_length, f"pairs/{tier}/train")
    check_prompt_lengths([r["prompt"] for r in val], tokenizer, max_prompt_length, f"pairs/{tier}/eval")
    return (
        training.dataset(train, PAIR_COLUMNS),
        training.dataset(val, PAIR_COLUMNS) if val else None,
        train,
        len(val),
    )
