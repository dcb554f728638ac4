"""Which training pairs β-DPO's data filter drops, judged by the oracle.

β-DPO keeps int(N·(1 − ρ)) of each optimiser step's N pairs, drawn without replacement with weights
p_i = exp(−½((A_i − μ)/s)²) around the EMAs μ, s of the gap A (docs/method.md eq. (10)–(11)). Pairs whose gap lies
far from the batch's typical gap, on either side, are drawn less often. This script asks what those pairs are. For
each policy run it

1. computes every training pair's implicit margin h under the run's final policy and the SFT reference (the same
   tokenisation, truncation and log-probabilities the training step uses);
2. applies the filter as it stands at the end of training: the gap A = h (official β-DPO) or β0·h (the MADPO
   repository's variant and its α = 0 ablation), μ and s the last logged EMAs (for a run without a filter, such as
   DPO, the mean and SD of its own gaps, the point the EMAs settle at), and draws the kept pairs of many random
   batches of the run's optimiser-step size (Gumbel top-k: the same law as a draw without replacement);
3. reports the keep rate of the pairs whose label the oracle contradicts against the rest, and where the dropped
   pairs sit (below μ or above).

This is the end-of-training filter on end-of-training gaps, not a replay of the steps (each step's gaps came from
that step's policy); it says which pairs the filter favours once the policy has learnt what it learns.

    python bench/filter_audit.py runs/paper_size/policy-beta_dpo_filter_only-low-s0-* \
        runs/paper_size/policy-dpo-low-s0-* --out bench/results/paper_size/beta_dpo_filter

Writes `<out>.md` and `<out>.json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DRAWS = 200
"""Random batchings of the training pairs per run: each pair is drawn for about this many times."""


def last_logged(stage_dir: Path, tag: str) -> float | None:
    """The last value of a scalar the run logged (TensorBoard), or None when it logged none (a run without a filter)."""
    sys.path.insert(0, str(REPO / "bench"))
    from scalar_trace import trace

    try:
        return float(trace(stage_dir, tag)[-1])
    except SystemExit:
        return None


def logp_differences(model_dir: str, tokenizer_dir: str, rows: list[dict], run: dict, batch: int = 64) -> np.ndarray:
    """log π(chosen) − log π(rejected) under the model in `model_dir` for every training row, in the order of `rows`
    (NaN for a row the tokenizer dropped), tokenised and truncated as the policy's training step did."""
    import torch

    from madpo.data.collate import PreferenceCollator
    from madpo.data.formats import load_in_memory
    from madpo.data.tokenize import tokenize_dataset
    from madpo.modeling import load_causal_lm, load_tokenizer, sequence_logps
    from madpo.pipeline.stages.pairs import PAIR_COLUMNS
    from madpo.pipeline.stages.training import dataset

    tok = load_tokenizer(tokenizer_dir)
    ds, _ = tokenize_dataset(
        load_in_memory(dataset(rows, PAIR_COLUMNS)),
        tok,
        max_length=run["max_length"],
        max_prompt_length=run["max_prompt_length"],
        split="train",
    )
    collate = PreferenceCollator(tok.pad_token_id)
    out = np.full(len(rows), np.nan)
    model = load_causal_lm(model_dir).eval()
    with torch.no_grad():
        for start in range(0, len(ds), batch):
            b = collate([ds[i] for i in range(start, min(start + batch, len(ds)))])
            n = b["index"].numel()
            logps, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
            out[b["index"].numpy()] = (logps[:n] - logps[n:]).double().numpy()
    return out


_REFERENCE: dict[tuple[str, str], np.ndarray] = {}
"""The SFT reference's differences per (model, tier): runs of one build share them."""


def keep_rates(
    gap: np.ndarray, mu: float, s: float, step_pairs: int, kept: int, draws: int = DRAWS, seed: int = 0
) -> np.ndarray:
    """Each pair's share of draws in which the filter keeps it, over `draws` random batchings into optimiser steps
    of `step_pairs` pairs, `kept` of them drawn with weights exp(−½((gap − μ)/s)²) (Gumbel top-k)."""
    rng = np.random.default_rng(seed)
    n = gap.size - gap.size % step_pairs
    log_p = -0.5 * ((gap - mu) / s) ** 2
    hits = np.zeros(gap.size)
    seen = np.zeros(gap.size)
    for _ in range(draws):
        order = rng.permutation(gap.size)[:n].reshape(-1, step_pairs)
        keys = log_p[order] + rng.gumbel(size=order.shape)
        top = np.argsort(-keys, axis=1)[:, :kept]
        np.add.at(hits, np.take_along_axis(order, top, axis=1).ravel(), 1)
        np.add.at(seen, order.ravel(), 1)
    return hits / np.maximum(seen, 1)


def audit(stage_dir: Path) -> dict[str, Any]:
    from madpo.pipeline.stages import load_pairs
    from madpo.pipeline.stages.base import StageResult

    manifest = json.loads((stage_dir / "stage.json").read_text())
    run = manifest["config"]
    loss = run["loss"]
    pairs_dir = Path(manifest["upstream"]["pairs"]["path"])
    pairs = StageResult("pairs", "pairs", pairs_dir, "", json.loads((pairs_dir / "stage.json").read_text()), True)
    rows = load_pairs(pairs, run["tier"], "train")
    sft_dir = Path(manifest["upstream"]["sft"]["path"])
    sft_model = str(sft_dir / json.loads((sft_dir / "stage.json").read_text())["outputs"]["model"])
    if (sft_model, run["tier"]) not in _REFERENCE:
        _REFERENCE[(sft_model, run["tier"])] = logp_differences(sft_model, sft_model, rows, run)
    policy = logp_differences(str(stage_dir / manifest["outputs"]["model"]), sft_model, rows, run)
    h = policy - _REFERENCE[(sft_model, run["tier"])]  # the implicit margin, in nats
    ok = ~np.isnan(h)
    contradicted = np.array([r["oracle_chosen"] < r["oracle_rejected"] for r in rows])
    beta0 = float(loss.get("beta", 0.1))
    scaled = loss["class"].endswith("MADPORepoBetaDPOLoss")
    gap = (beta0 * h if scaled else h)[ok]
    mu = last_logged(stage_dir, "train/beta_dpo/gap_mean_step")
    s = last_logged(stage_dir, "train/beta_dpo/gap_std_step")
    ema = mu is not None and s is not None
    if not ema:  # no filter in this run: the point its EMAs would settle at
        mu, s = float(gap.mean()), float(gap.std(ddof=1))
    step_pairs = run["batch_size"] * run.get("accumulate_grad_batches", 1)
    kept = max(1, int(step_pairs * (1 - float(loss.get("rho", 0.2)))))
    rate = keep_rates(gap, mu, s, step_pairs, kept)
    bad = contradicted[ok]
    dropped = 1 - rate
    below = gap < mu
    return {
        "run": stage_dir.name,
        "loss": loss["class"].rsplit(".", 1)[-1] + (f" (α = {loss['alpha']:g})" if "alpha" in loss else ""),
        "pairs": int(ok.sum()),
        "gap": "β0·h" if scaled else "h",
        "mu": mu,
        "s": s,
        "ema": "last logged EMAs" if ema else "own gaps (no filter in this run)",
        "step_pairs": step_pairs,
        "kept": kept,
        "contradicted_share": float(bad.mean()),
        "keep_rate_contradicted": float(rate[bad].mean()),
        "keep_rate_agreeing": float(rate[~bad].mean()),
        "contradicted_share_of_dropped": float((dropped * bad).sum() / dropped.sum()),
        "dropped_below_mu": float((dropped * below).sum() / dropped.sum()),
        "mean_h_contradicted": float(h[ok][bad].mean()),
        "mean_h_agreeing": float(h[ok][~bad].mean()),
    }


def markdown(results: list[dict], command: str) -> str:
    lines = [
        "# Which pairs β-DPO's filter drops at the end of training",
        "",
        f"- Command: `{command}`",
        f"- Each pair's keep rate over {DRAWS} random batchings into optimiser steps; a filter that ignored the gap "
        "would keep every pair at kept / step pairs.",
        "",
        "| run | loss | gap | μ / s | kept of | contradicted pairs | keep rate: contradicted / agreeing | "
        "contradicted share of the dropped | dropped below μ | mean h: contradicted / agreeing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['run']} | {r['loss']} | {r['gap']} | {r['mu']:.3f} / {r['s']:.3f} ({r['ema']}) "
            f"| {r['kept']} / {r['step_pairs']} | {r['contradicted_share']:.3f} "
            f"| {r['keep_rate_contradicted']:.3f} / {r['keep_rate_agreeing']:.3f} "
            f"| {r['contradicted_share_of_dropped']:.3f} | {r['dropped_below_mu']:.3f} "
            f"| {r['mean_h_contradicted']:.2f} / {r['mean_h_agreeing']:.2f} |"
        )
    lines += [
        "",
        "Contradicted: the oracle scores the rejected completion above the chosen one (the label is noise to the "
        "oracle). h under the run's final policy against the SFT reference, in nats.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("stage_dirs", nargs="+", help="policy stage directories (runs/<config>/policy-*)")
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    opts = p.parse_args(argv)
    results = [audit(Path(d)) for d in opts.stage_dirs]
    md = markdown(results, "python bench/filter_audit.py " + shlex.join(argv))
    print(md)
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out + ".md").write_text(md)
        Path(opts.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
