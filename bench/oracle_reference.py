"""How much of a reward model's disagreement with the oracle is the oracle's own: the pipeline's oracle beside a
reference oracle trained on more reviews, and VADER, on the same held-out pairs.

A reward model is judged against the oracle its pairs' labels were drawn from (bench/rm_quality.py). Where that
oracle is itself weak (configs/pipeline/paper_size.yaml: 12,000 prompts leave it 800 training reviews), a reward
model that learnt sentiment can disagree with it where the oracle is wrong, and a bag-of-words Bradley–Terry model
(the TF-IDF reference, the same model class as a TF-IDF oracle) can agree with it by copying its quirks. This script
separates the two. Per tier, on the held-out pairs the reward model never saw (eval pairs past the `reward.n_val`
it early-stopped on), it scores

- the scorers: the labels, the reward model's margins, the TF-IDF BT reference (trained on the tier's training
  pairs), and each oracle's gap;
- against each truth: the pipeline's oracle gap (what the labels were drawn from), the reference oracle's gap (the
  same TF-IDF recipe on `--reference-train` reviews; it may borrow prompt reviews, which shifts both sides of a pair
  alike) and VADER's (a lexicon that never saw IMDB);

as sign agreement and Pearson correlation. Each oracle's accuracy is measured on reviews neither TF-IDF oracle
trained on (class-balanced), whole and cut to the length it scores.

    python bench/oracle_reference.py -c configs/pipeline/paper_size.yaml --tiers high

Builds or reads the pipeline's stages up to the tier's reward model (cached, as `python cli.py pipeline`). Writes
`oracle_reference.md` and `.json` under --results-dir. Any option not listed is a pipeline flag.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as bench/reproduce.py does

import numpy as np  # noqa: E402

from madpo.pipeline.config import TIER_NAMES, PipelineConfig  # noqa: E402
from madpo.pipeline.run import configure_logging, parse_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRUTHS = ("pipeline oracle", "reference oracle", "VADER")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="reward model vs oracle noise", epilog="other flags: pipeline")
    p.add_argument("--tiers", default="high", help="comma-separated tiers")
    p.add_argument("--reference-train", type=int, default=10_000, help="reviews the reference TF-IDF oracle trains on")
    p.add_argument(
        "--accuracy-reviews",
        type=int,
        default=None,
        help="measure the oracles' accuracy on at most this many reviews (class-balanced; default: every review "
        "neither TF-IDF oracle trained on)",
    )
    p.add_argument(
        "--held-from",
        type=int,
        default=None,
        help="score the eval pairs from this index on (default: reward.n_val, the first the reward model never saw); "
        "a common start puts reward models validated on different slices on the same pairs",
    )
    p.add_argument("--results-dir", default=str(REPO / "bench" / "results" / "paper_size"))
    return p


def agreement(scores: np.ndarray, truth: np.ndarray) -> dict[str, float | int | None]:
    """Share of pairs with truth ≠ 0 where sign(score) = sign(truth) (a score of 0 disagrees), its binomial SE, and
    Pearson corr (None for a constant score, such as the labels')."""
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    informative = t != 0
    n = int(informative.sum())
    share = float((np.sign(s[informative]) == np.sign(t[informative])).mean()) if n else None
    corr = float(np.corrcoef(s, t)[0, 1]) if s.std() > 0 and t.std() > 0 else None
    se = float(np.sqrt(share * (1 - share) / n)) if n else None
    return {"agreement": share, "se": se, "corr": corr, "n": n}


def balanced(indices: np.ndarray, labels: np.ndarray, seed: int, most: int | None = None) -> np.ndarray:
    """`indices` subsampled (seeded) to as many of each class as the rarer class has, `most` // 2 at the most."""
    rng = np.random.default_rng(seed)
    by = [indices[labels[indices] == c] for c in (0, 1)]
    k = min(min(len(b) for b in by), most // 2 if most is not None else len(indices))
    return np.sort(np.concatenate([rng.choice(b, k, replace=False) for b in by]))


def oracles(
    cfg: PipelineConfig, pipe: Any, n_reference: int, n_accuracy: int | None = None
) -> tuple[dict[str, Any], dict[str, dict]]:
    """({name: oracle}, {name: accuracy on reviews neither TF-IDF oracle trained on, whole and as snippets})."""
    from madpo.modeling import load_tokenizer
    from madpo.pipeline.oracle import TfidfOracle, VaderOracle, oracle_accuracy
    from madpo.pipeline.reviews import imdb_slices
    from madpo.pipeline.stages import load_oracle, load_reviews, load_slices

    reviews, slices = load_reviews(pipe.reviews()), load_slices(pipe.reviews())
    labels = np.asarray(reviews["label"])
    d = cfg.data
    reference = imdb_slices(
        labels,
        n_prompts=d.n_prompts,
        n_sft=d.n_sft,
        n_oracle_train=n_reference,
        n_oracle_heldout=d.n_oracle_heldout,
        seed=d.seed,
        oracle_may_use_prompts=True,
    )
    o = cfg.oracle
    found = {
        "pipeline oracle": load_oracle(pipe.oracle(), o),
        "reference oracle": TfidfOracle.fit(
            reference.texts(reviews, "oracle_train"),
            reference.labels(reviews, "oracle_train"),
            ngram_max=o.ngram_max,
            min_df=o.min_df,
            C=o.C,
        ),
        "VADER": VaderOracle(),
    }
    trained = set(slices.oracle_train) | set(reference.oracle_train)
    held = balanced(np.asarray([i for i in range(len(labels)) if i not in trained]), labels, d.seed, n_accuracy)
    texts = list(reviews.select(held.tolist())["text"])
    tok = load_tokenizer(pipe.tokenizer().output("tokenizer"))
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    snippets = tok.batch_decode(
        [i[: pipe.snippet_tokens] for i in ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    accuracy = {
        name: {
            "n_train": {"pipeline oracle": len(slices.oracle_train), "reference oracle": n_reference}.get(name),
            "full": oracle_accuracy(oracle, texts, labels[held]),
            "snippet": oracle_accuracy(oracle, snippets, labels[held]),
            "n": len(held),
        }
        for name, oracle in found.items()
    }
    return found, accuracy


def tier_table(
    cfg: PipelineConfig, pipe: Any, tier: str, found: dict[str, Any], held_from: int | None = None
) -> dict[str, Any]:
    """Agreement of every scorer with every truth on the tier's eval pairs from `held_from` (default
    `reward.n_val`) on."""
    from madpo.modeling import load_tokenizer
    from madpo.pipeline.rm_quality import tfidf_bt_margins
    from madpo.pipeline.stages import load_pairs, score_rm_margins
    from madpo.pipeline.stages.pairs import PAIR_COLUMNS
    from madpo.pipeline.stages.training import dataset

    reward = pipe.reward(tier)
    rows = load_pairs(pipe.pairs(), tier, "eval")[held_start(cfg, held_from) :]
    tok = load_tokenizer(pipe.sft().output("model"))
    scored, _ = score_rm_margins(pipe.ctx, reward, tok, {"held": dataset(rows, PAIR_COLUMNS)}, pipe.lengths, under=None)
    index = np.asarray(scored["held"]["index"], dtype=int)
    rows = [rows[i] for i in index]  # pairs tokenization dropped are dropped for every scorer
    gaps: dict[str, np.ndarray] = {
        "pipeline oracle": np.asarray([r["oracle_chosen"] - r["oracle_rejected"] for r in rows])
    }
    for name in ("reference oracle", "VADER"):
        chosen = found[name].score([r["prompt"] + r["chosen"] for r in rows])
        rejected = found[name].score([r["prompt"] + r["rejected"] for r in rows])
        gaps[name] = np.asarray(chosen) - np.asarray(rejected)
    train_rows = load_pairs(pipe.pairs(), tier, "train")
    scorers = {
        "labels": np.ones(len(rows)),
        "reward model": np.asarray(scored["held"]["rm_margin"], dtype=np.float64),
        "TF-IDF BT reference": tfidf_bt_margins(train_rows, rows)[0],
        **gaps,
    }
    table = {s: {t: agreement(v, gaps[t]) for t in TRUTHS if t != s} for s, v in scorers.items()}
    return {
        "n_pairs": len(rows),
        "held_from": held_start(cfg, held_from),
        "reward_stage": reward.path.name,
        "reward_n_val": cfg.reward.n_val,
        "n_train_pairs": len(train_rows),
        "table": table,
    }


def held_start(cfg: PipelineConfig, held_from: int | None) -> int:
    """The first eval pair scored: `held_from`, or the first past the reward model's validation slice."""
    n_val = cfg.reward.n_val
    if n_val is None:
        raise SystemExit("oracle_reference: reward.n_val is null, so the reward model validated on every eval pair")
    if held_from is None:
        return n_val
    if held_from < n_val:
        raise SystemExit(
            f"oracle_reference: --held-from {held_from} is inside the reward model's validation slice "
            f"(reward.n_val={n_val}), whose pairs chose its weights"
        )
    return held_from


def _f(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def write_report(out: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    from madpo.pipeline.stages import write_json_atomic

    lines = [
        "# The reward model against the oracle's own noise",
        "",
        f"- Command: `{doc['command']}`",
        f"- Machine: {doc['machine']}; {doc['minutes']:.1f} min wall.",
        "- Truths: the pipeline's oracle (the labels are Bradley–Terry draws from its gap), a reference oracle (the "
        f"same TF-IDF recipe on {doc['reference_train']:,} reviews, allowed to borrow prompt reviews) and VADER (a "
        "lexicon that never saw IMDB). Agreement: share of pairs with a non-zero truth gap where the scorer's sign "
        "is the truth's; corr: Pearson. The labels' agreement is the share of pairs whose label the truth prefers.",
        "",
        "Oracle accuracy on IMDB reviews neither TF-IDF oracle trained on (class-balanced), whole and cut to the "
        "snippet length the oracle scores:",
        "",
        "| oracle | trained on | accuracy, whole reviews | accuracy, snippets | reviews |",
        "|---|---|---|---|---|",
    ]
    for name, a in doc["oracle_accuracy"].items():
        n_train = f"{a['n_train']:,}" if a["n_train"] else "– (lexicon)"
        lines.append(f"| {name} | {n_train} | {_f(a['full'])} | {_f(a['snippet'])} | {a['n']:,} |")
    for tier, t in doc["tiers"].items():
        lines += [
            "",
            f"## Tier {tier}: {t['n_pairs']:,} held-out pairs (eval pairs from {t.get('held_from', '?')} on; reward "
            f"model `{t['reward_stage']}`, trained on {t['n_train_pairs']:,} pairs, validated on "
            f"{t.get('reward_n_val', '?')})",
            "",
            "| scorer | " + " | ".join(f"vs {x}: agreement ± SE (corr)" for x in TRUTHS) + " |",
            "|---|" + "---|" * len(TRUTHS),
        ]
        for scorer, row in t["table"].items():
            cells = []
            for x in TRUTHS:
                a = row.get(x)
                cells.append("–" if a is None else f"{_f(a['agreement'])} ± {_f(a['se'])} ({_f(a['corr'], '.2f')})")
            lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    md, js = out / "oracle_reference.md", out / "oracle_reference.json"
    md.write_text("\n".join(lines) + "\n")
    write_json_atomic(js, doc)
    return md, js


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from madpo.pipeline.stages import Pipeline, say

    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = parser().parse_known_args(argv)
    cfg = parse_config(rest)
    cfg.validate()
    tiers = [t for t in opts.tiers.split(",") if t]
    for t in tiers:
        if t not in TIER_NAMES:
            raise SystemExit(f"oracle_reference: unknown tier {t!r}; expected some of {list(TIER_NAMES)}")
    if cfg.oracle.kind != "tfidf":
        raise SystemExit(f"oracle_reference: compares TF-IDF oracles; the config's oracle is {cfg.oracle.kind!r}")
    configure_logging()
    if cfg.trainer.num_threads:
        import torch

        torch.set_num_threads(cfg.trainer.num_threads)
    start = time.perf_counter()
    pipe = Pipeline(cfg)
    found, accuracy = oracles(cfg, pipe, opts.reference_train, opts.accuracy_reviews)
    doc: dict[str, Any] = {
        "command": f"python bench/oracle_reference.py {shlex.join(argv)}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "reference_train": opts.reference_train,
        "oracle_accuracy": accuracy,
        "tiers": {t: tier_table(cfg, pipe, t, found, opts.held_from) for t in tiers},
    }
    doc["minutes"] = (time.perf_counter() - start) / 60
    out = Path(opts.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = write_report(out, doc)
    say(f"oracle_reference: wrote {md} and {js}")
    return doc


if __name__ == "__main__":
    main()
