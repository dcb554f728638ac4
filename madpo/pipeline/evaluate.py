"""Evaluation of a policy (docs/method.md eq. (38), plus the KL estimate of eq. (39), which the paper leaves out).

One sampled continuation per eval prompt, scored by the oracle on prompt + continuation (as the paper scores the
decoded full sequence): the mean oracle reward with its standard error SD/√n (ddof 1) and 95 % interval ±1.96·SE,
and a Monte-Carlo estimate of KL(π‖π_ref) = E_{y∼π}[log π(y|x) − log π_ref(y|x)] over the same samples (their
exact token ids, EOS included where sampled), summed over continuation tokens with `madpo.modeling.sequence_logps`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from madpo.io import atomic_write_json, atomic_write_text
from madpo.modeling import sequence_logps
from madpo.pipeline.generate import decode_continuation, encode_prompt, sample_continuation_ids
from madpo.pipeline.oracle import checked_scores
from madpo.serialize import format_mean_se
from madpo.serialize import format_number as _fmt

Z95 = 1.96


def reward_summary(rewards: Sequence[float] | np.ndarray) -> dict:
    """n, mean, sd (ddof 1), se = sd/√n, ci95_low/high = mean ∓ 1.96·se (sd/se/ci are None for n = 1)."""
    x = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("reward_summary: no values")
    if not np.isfinite(x).all():
        raise ValueError(f"reward_summary: non-finite value at row {int(np.flatnonzero(~np.isfinite(x))[0])}")
    mean = float(x.mean())
    if x.size < 2:
        return {"n": 1, "mean": mean, "sd": None, "se": None, "ci95_low": None, "ci95_high": None}
    sd = float(x.std(ddof=1))
    se = sd / math.sqrt(x.size)
    return {
        "n": int(x.size),
        "mean": mean,
        "sd": sd,
        "se": se,
        "ci95_low": mean - Z95 * se,
        "ci95_high": mean + Z95 * se,
    }


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def per_sequence_log_ratio(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str] | Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Σ_t [log π(y_t|…) − log π_ref(y_t|…)] over each continuation's tokens, and the token counts.

    A continuation is a string (tokenized without special tokens) or the exact sampled token ids."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for p, c in zip(prompts, continuations, strict=True):
        cont = list(tokenizer(c, add_special_tokens=False)["input_ids"]) if isinstance(c, str) else [int(t) for t in c]
        rows.append((encode_prompt(tokenizer, p), cont))
    ratios, counts = [], []
    modes = (policy.training, reference.training)
    policy.eval()
    reference.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(rows), batch_size):
                chunk = rows[b : b + batch_size]
                width = max(len(p) + len(c) for p, c in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(chunk), width), dtype=torch.long)
                comp = torch.zeros((len(chunk), width), dtype=torch.bool)
                for i, (p, c) in enumerate(chunk):
                    ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
                    attn[i, : len(p) + len(c)] = 1
                    comp[i, len(p) : len(p) + len(c)] = True
                lp, n = sequence_logps(policy, *(t.to(_model_device(policy)) for t in (ids, attn, comp)))
                lr, _ = sequence_logps(reference, *(t.to(_model_device(reference)) for t in (ids, attn, comp)))
                ratios.append((lp.cpu() - lr.cpu()).double().numpy())
                counts.append(n.cpu().numpy())
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    return np.concatenate(ratios), np.concatenate(counts)


def kl_estimate(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str] | Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
) -> dict:
    """Monte-Carlo KL(π‖π_ref) over the policy's own samples: mean and SE of the per-sequence log-ratio (nats),
    plus the mean continuation length. Unbiased only when the continuations were sampled from `policy` at
    temperature 1 without top-k/top-p truncation."""
    ratio, counts = per_sequence_log_ratio(policy, reference, tokenizer, prompts, continuations, batch_size=batch_size)
    summary = reward_summary(ratio)
    return {
        "n": summary["n"],
        "mean": summary["mean"],
        "se": summary["se"],
        "sd": summary["sd"],
        "mean_tokens": float(np.mean(counts)) if counts.size else 0.0,
    }


def evaluate_policy(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    tokenizer,
    oracle,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    n_examples: int = 5,
    temperature: float | None = 1.0,
    top_k: int | None = 0,
    top_p: float | None = 1.0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Sample one continuation per prompt from `policy`, score prompt + continuation with the oracle, and estimate
    KL(policy‖reference) on the same samples (skipped when `reference` is None). Returns a JSON-ready dict with
    `reward` (`reward_summary`), `kl`, `examples` (the first `n_examples` prompts), `generation`, `oracle`."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_policy: no prompts")
    device = device if device is not None else _model_device(policy)
    ids, gen_stats = sample_continuation_ids(
        policy,
        tokenizer,
        prompts,
        num_samples=1,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        device=device,
        progress=progress,
        desc="evaluating",
    )
    sample_ids = [s[0] for s in ids]
    continuations = [decode_continuation(tokenizer, s) for s in sample_ids]
    rewards = checked_scores(oracle, [p + c for p, c in zip(prompts, continuations, strict=True)])
    kl = None
    if reference is not None:
        kl = kl_estimate(policy, reference, tokenizer, prompts, sample_ids, batch_size=batch_size)
    describe = getattr(oracle, "describe", None)
    return {
        "reward": reward_summary(rewards),
        "kl": kl,
        "examples": [
            {"prompt": p, "continuation": c, "reward": float(r)}
            for p, c, r in list(zip(prompts, continuations, rewards, strict=True))[:n_examples]
        ],
        "generation": {
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "seed": seed,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            **gen_stats,
        },
        "oracle": describe() if callable(describe) else {"name": getattr(oracle, "name", type(oracle).__name__)},
    }


# ----------------------------------------------------------------------------------------------------------------
# writing results
# ----------------------------------------------------------------------------------------------------------------


def _cell(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def results_markdown(results: dict) -> str:
    """A small markdown summary of an `evaluate_policy` result (extra top-level keys are listed as settings)."""
    lines = ["| metric | value |", "|---|---|"]
    reward = results.get("reward") or {}
    if reward:
        lines.append(f"| mean oracle reward | {format_mean_se(reward.get('mean'), reward.get('se'))} |")
        lines.append(f"| 95 % interval | [{_fmt(reward.get('ci95_low'))}, {_fmt(reward.get('ci95_high'))}] |")
        lines.append(f"| SD | {_fmt(reward.get('sd'))} |")
        lines.append(f"| n | {_fmt(reward.get('n'))} |")
    kl = results.get("kl")
    if kl:
        lines.append(f"| KL(policy‖reference), nats | {format_mean_se(kl.get('mean'), kl.get('se'))} |")
        lines.append(f"| mean continuation tokens | {_fmt(kl.get('mean_tokens'), 1)} |")
    oracle = results.get("oracle") or {}
    if oracle:
        lines.append(f"| oracle | {_cell(oracle.get('name', '?'))} |")
        lines.append(f"| oracle held-out accuracy | {_fmt(oracle.get('heldout_accuracy'))} |")
    for key, value in results.items():
        if key not in ("reward", "kl", "oracle", "examples", "generation") and not isinstance(value, dict | list):
            lines.append(f"| {_cell(key)} | {_cell(_fmt(value))} |")
    examples = results.get("examples") or []
    if examples:
        lines += ["", "| prompt | continuation | reward |", "|---|---|---|"]
        lines += [f"| {_cell(e['prompt'])} | {_cell(e['continuation'])} | {_fmt(e['reward'])} |" for e in examples]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `results.json` (NaN/inf → null) and `results.md`, each atomically; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, results_markdown(results))
    return json_path, md_path


def log_to_tensorboard(results: dict, log_dir: str | Path, *, step: int = 0, prefix: str = "eval") -> None:
    """Scalars (reward mean/SE/SD/CI, KL mean/SE, oracle accuracy) and the example generations as a text table."""
    from torch.utils.tensorboard import SummaryWriter

    scalars: dict[str, Any] = {}
    for key in ("mean", "se", "sd", "ci95_low", "ci95_high"):
        scalars[f"reward_{key}"] = (results.get("reward") or {}).get(key)
    for key in ("mean", "se", "mean_tokens"):
        scalars[f"kl_{key}"] = (results.get("kl") or {}).get(key)
    scalars["oracle_heldout_accuracy"] = (results.get("oracle") or {}).get("heldout_accuracy")
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for key, value in scalars.items():
            if isinstance(value, int | float) and math.isfinite(value):
                writer.add_scalar(f"{prefix}/{key}", float(value), step)
        examples = results.get("examples") or []
        if examples:
            table = ["| prompt | continuation | reward |", "|---|---|---|"]
            table += [
                f"| {_cell(e['prompt'])} | {_cell(e['continuation'], 500)} | {_fmt(e['reward'])} |" for e in examples
            ]
            writer.add_text(f"{prefix}/examples", "\n".join(table), step)
        writer.flush()
    finally:
        writer.close()


__all__ = [
    "evaluate_policy",
    "kl_estimate",
    "log_to_tensorboard",
    "per_sequence_log_ratio",
    "results_markdown",
    "reward_summary",
    "write_results",
]
