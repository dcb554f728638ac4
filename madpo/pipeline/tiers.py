"""The paper's three preference-data quality tiers and their Gumbel-noise Bradley–Terry labels (docs/method.md
eq. (35)–(36)).

Per prompt i there are two policy samples (y1, y2) and the original negative review y_orig, all scored by the oracle:
- **high**: (sample 1, sample 2) for every row (on-policy, small oracle gaps);
- **medium**: rows i < n // 2 (the paper's "first 6,000" of 12,000) as low, the rest as high;
- **low**: (best-of-2 sample by oracle, original review) for every row (large gaps, off-policy).
The best of two is sample 1 on a tie.

`make_preference_splits` then shuffles the rows once (seeded; the paper's shuffle was unseeded), draws labels with
`gumbel_labels` (y_a ≻ y_b iff r_a + G_a ≥ r_b + G_b, G ~ Gumbel(0, 1), so P(y_a ≻ y_b) = σ(r_a − r_b)), splits by
counts (first `n_train` shuffled rows train, last `n_eval` evaluate, as the paper's 10,000 / 2,000) and writes
TRL-format rows. The shuffle permutes prompt rows, the same permutation for every tier, so all three tiers share
their train and eval prompts. Pairs whose two texts are identical carry no preference: they are dropped and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

TIERS = ("high", "medium", "low")
SAMPLE1, SAMPLE2, ORIGINAL = "sample1", "sample2", "original"


def _as_scores(name: str, values: Sequence[float], n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected {n} oracle scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: non-finite oracle score at row {int(np.flatnonzero(~np.isfinite(arr))[0])}")
    return arr


def build_tiers(
    prompts: Sequence[str],
    sample1: Sequence[str],
    sample2: Sequence[str],
    original: Sequence[str],
    r1: Sequence[float],
    r2: Sequence[float],
    r_orig: Sequence[float],
) -> dict[str, list[dict]]:
    """Unlabelled candidate pairs per tier, in prompt order: dicts with `prompt_index`, `prompt`, `text_a`, `text_b`,
    `oracle_a`, `oracle_b`, `source_a`, `source_b` (sources: sample1 / sample2 / original).

    `sample1`, `sample2`, `original` are continuations of the prompt (`generate.split_review` gives the original's);
    the scores are the oracle's on the full texts (prompt + continuation), as the paper scores decoded sequences.
    """
    n = len(prompts)
    for name, col in (("sample1", sample1), ("sample2", sample2), ("original", original)):
        if len(col) != n:
            raise ValueError(f"build_tiers: {len(col)} {name} texts for {n} prompts")
    if n == 0:
        raise ValueError("build_tiers: no prompts")
    r1, r2, r_orig = _as_scores("r1", r1, n), _as_scores("r2", r2, n), _as_scores("r_orig", r_orig, n)

    def high(i: int) -> dict:
        return {
            "text_a": sample1[i],
            "text_b": sample2[i],
            "oracle_a": float(r1[i]),
            "oracle_b": float(r2[i]),
            "source_a": SAMPLE1,
            "source_b": SAMPLE2,
        }

    def low(i: int) -> dict:
        first = r1[i] >= r2[i]
        return {
            "text_a": sample1[i] if first else sample2[i],
            "text_b": original[i],
            "oracle_a": float(r1[i] if first else r2[i]),
            "oracle_b": float(r_orig[i]),
            "source_a": SAMPLE1 if first else SAMPLE2,
            "source_b": ORIGINAL,
        }

    half = n // 2
    tiers: dict[str, list[dict]] = {"high": [], "medium": [], "low": []}
    for i in range(n):
        base = {"prompt_index": i, "prompt": prompts[i]}
        tiers["high"].append({**base, **high(i)})
        tiers["medium"].append({**base, **(low(i) if i < half else high(i))})
        tiers["low"].append({**base, **low(i)})
    return tiers


def gumbel_labels(r1: Sequence[float], r2: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Bradley–Terry labels by the Gumbel trick: True where y1 ≻ y2, i.e. r1 + G1 ≥ r2 + G2 with G ~ Gumbel(0, 1)
    (G1 for all rows drawn first, then G2). P(True) = σ(r1 − r2)."""
    r1, r2 = np.asarray(r1, dtype=np.float64), np.asarray(r2, dtype=np.float64)
    if r1.shape != r2.shape or r1.ndim != 1:
        raise ValueError(f"gumbel_labels: r1 and r2 must be 1-D of equal length; got {r1.shape} and {r2.shape}")
    g1 = rng.gumbel(0.0, 1.0, size=r1.shape)
    g2 = rng.gumbel(0.0, 1.0, size=r2.shape)
    return r1 + g1 >= r2 + g2


def to_trl_row(pair: dict, first_preferred: bool, tier: str) -> dict:
    """A labelled TRL-format row: `prompt`, `chosen`, `rejected` + oracle scores and provenance."""
    a, b = ("a", "b") if first_preferred else ("b", "a")
    chosen, rejected = pair[f"oracle_{a}"], pair[f"oracle_{b}"]
    return {
        "prompt": pair["prompt"],
        "chosen": pair[f"text_{a}"],
        "rejected": pair[f"text_{b}"],
        "oracle_chosen": chosen,
        "oracle_rejected": rejected,
        "label_agrees_with_oracle": bool(chosen >= rejected),
        "prompt_index": int(pair["prompt_index"]),
        "chosen_source": pair[f"source_{a}"],
        "rejected_source": pair[f"source_{b}"],
        "tier": tier,
    }


def make_preference_splits(
    tiers: dict[str, list[dict]],
    *,
    n_eval: int,
    n_train: int | None = None,
    shuffle_seed: int = 0,
    label_seed: int = 42,
) -> tuple[dict[str, dict[str, list[dict]]], dict]:
    """Shuffle, label and split every tier: returns `({tier: {"train": rows, "eval": rows}}, report)`.

    The shuffle is one permutation of the prompt rows (`default_rng(shuffle_seed)`), shared by all tiers; labels are
    drawn per tier with a fresh `default_rng(label_seed)` over the shuffled rows (all rows, so dropping a pair never
    shifts another pair's noise). Train = the first `n_train` shuffled rows (None: all but the eval rows), eval = the
    last `n_eval`. The report counts, per tier and split, the identical-text pairs dropped, and gives
    `label_noise_stats` of what was kept.
    """
    sizes = {name: len(rows) for name, rows in tiers.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"make_preference_splits: tiers differ in size {sizes}; build them with build_tiers")
    n = next(iter(sizes.values()))
    if n_train is None:
        n_train = n - n_eval
    if n_eval < 0 or n_train < 0 or n_train + n_eval > n:
        raise ValueError(f"make_preference_splits: n_train={n_train} + n_eval={n_eval} must fit the {n} rows")
    order = np.random.default_rng(shuffle_seed).permutation(n)
    positions = {"train": range(0, n_train), "eval": range(n - n_eval, n)}
    splits: dict[str, dict[str, list[dict]]] = {}
    report: dict = {
        "n_rows": n,
        "n_train_rows": n_train,
        "n_eval_rows": n_eval,
        "shuffle_seed": shuffle_seed,
        "label_seed": label_seed,
        "tiers": {},
    }
    for name, rows in tiers.items():
        shuffled = [rows[i] for i in order]
        labels = gumbel_labels(
            [p["oracle_a"] for p in shuffled], [p["oracle_b"] for p in shuffled], np.random.default_rng(label_seed)
        )
        splits[name] = {}
        tier_report: dict = {"n_first_preferred": int(labels.sum()), "n_second_preferred": int((~labels).sum())}
        for split, span in positions.items():
            kept, dropped = [], 0
            for pos in span:
                pair = shuffled[pos]
                if pair["text_a"] == pair["text_b"]:
                    dropped += 1
                    continue
                kept.append(to_trl_row(pair, bool(labels[pos]), name))
            if dropped:
                log.warning("tier %s/%s: dropped %d pair(s) whose two texts are identical", name, split, dropped)
            splits[name][split] = kept
            tier_report[split] = {"n": len(kept), "dropped_identical": dropped, **label_noise_stats(kept)}
        report["tiers"][name] = tier_report
    return splits, report


def label_noise_stats(rows: Sequence[dict]) -> dict:
    """How noisy the labels are against the oracle: `frac_disagree` (chosen has the lower oracle score),
    `mean_abs_oracle_gap` |r_chosen − r_rejected|, and where the chosen texts come from."""
    if not rows:
        return {"n": 0, "n_disagree": 0, "frac_disagree": None, "mean_abs_oracle_gap": None, "chosen_source_counts": {}}
    chosen = np.asarray([r["oracle_chosen"] for r in rows], dtype=np.float64)
    rejected = np.asarray([r["oracle_rejected"] for r in rows], dtype=np.float64)
    disagree = int(sum(not r["label_agrees_with_oracle"] for r in rows))
    return {
        "n": len(rows),
        "n_disagree": disagree,
        "frac_disagree": disagree / len(rows),
        "mean_abs_oracle_gap": float(np.mean(np.abs(chosen - rejected))),
        "mean_oracle_chosen": float(chosen.mean()),
        "mean_oracle_rejected": float(rejected.mean()),
        "chosen_source_counts": dict(sorted(Counter(r.get("chosen_source", "?") for r in rows).items())),
    }


__all__ = [
    "ORIGINAL",
    "SAMPLE1",
    "SAMPLE2",
    "TIERS",
    "build_tiers",
    "gumbel_labels",
    "label_noise_stats",
    "make_preference_splits",
    "to_trl_row",
]
