"""`python cli.py pipeline -c configs/pipeline/quickstart.yaml [--policy.method dpo ...]`: the offline IMDB experiment
end to end, every stage cached (see `madpo.pipeline.stages`), ending with the results table: the SFT model vs the
trained policy, mean oracle reward ± SE, 95 % interval, KL to the SFT reference, oracle accuracy and the wall time of
every stage. The table is printed and written to `<output_dir>/results.md` and `results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from madpo.hardware import resolve_precision, slow_precision_warning
from madpo.io import atomic_write_json, atomic_write_text
from madpo.losses import loss_config
from madpo.pipeline.config import PipelineConfig
from madpo.pipeline.stages import Pipeline, StageError, StageResult, quiet_libraries, say

log = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    """The pipeline's argument parser: `-c/--config` YAML files plus one dotted flag per config field."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="python cli.py pipeline",
        description="The offline IMDB MADPO experiment: reviews -> tokenizer -> oracle -> base LM -> SFT -> pairs -> "
        "reward model -> policy -> evaluation. Every stage is cached under output_dir.",
        default_env=False,
    )
    parser.add_argument(
        "-c",
        "--config",
        action=ActionConfigFile,
        help="YAML config file(s), e.g. configs/pipeline/quickstart.yaml; later flags override it",
    )
    parser.add_class_arguments(PipelineConfig, as_group=False)
    return parser


def _to_config(init: Namespace) -> PipelineConfig:
    cfg = PipelineConfig(**{f.name: init[f.name] for f in dataclasses.fields(PipelineConfig)})
    # `precision: auto` becomes this machine's choice here, so that stage keys and sweep cells name what ran
    cfg.trainer.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    warning = slow_precision_warning(cfg.trainer.precision, cfg.trainer.accelerator)
    if warning:
        logging.getLogger("madpo.pipeline").warning(warning)
    return cfg


def parse_config(argv: list[str] | None = None) -> PipelineConfig:
    """Parse command-line arguments (and config files) into a `PipelineConfig`."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return _to_config(instantiate(ns))


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("madpo").setLevel(logging.WARNING)
    for name in ("madpo.pipeline.oracle", "madpo.pipeline.tiers", "madpo.pipeline.stages"):
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()


# ------------------------------------------------------------------------------------------------------------------
# The results table
# ------------------------------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def model_row(name: str, evaluation: StageResult) -> dict:
    """One row of the results table from an evaluate stage."""
    stats = evaluation.stats
    reward, kl = stats["reward"], stats.get("kl") or {}
    return {
        "model": name,
        "stage": evaluation.label,
        "mean": reward["mean"],
        "se": reward["se"],
        "sd": reward["sd"],
        "ci95_low": reward["ci95_low"],
        "ci95_high": reward["ci95_high"],
        "n": reward["n"],
        "kl": kl.get("mean"),
        "kl_se": kl.get("se"),
        "mean_tokens": kl.get("mean_tokens"),
    }


def difference(row: dict, other: dict, name: str, other_name: str) -> dict:
    """`row` − `other` in mean oracle reward (SE of independent samples, normal 95 % CI) and in KL."""
    diff = row["mean"] - other["mean"]
    se = (row["se"] ** 2 + other["se"] ** 2) ** 0.5
    kl = None if row["kl"] is None or other["kl"] is None else row["kl"] - other["kl"]
    return {
        "policy": name,
        "other": other_name,
        "reward": diff,
        "reward_se": se,
        "ci95_low": diff - 1.96 * se,
        "ci95_high": diff + 1.96 * se,
        "kl": kl,
    }


def reward_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | mean oracle reward ± SE | 95 % interval | KL(π‖π_SFT), nats | n |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        kl = "0 (reference)" if r["kl"] == 0.0 else f"{_f(r['kl'], 2)} ± {_f(r['kl_se'], 2)}"
        lines.append(
            f"| {r['model']} | {_f(r['mean'])} ± {_f(r['se'])} | [{_f(r['ci95_low'])}, {_f(r['ci95_high'])}] | "
            f"{kl} | {r['n']} |"
        )
    return lines


def stage_table(results: list[StageResult]) -> list[str]:
    """Wall and CPU time of every stage (from its manifest: a cached stage shows the time it took when it ran) and
    the machine's 1-minute load average when it started and ended (timings on a shared CPU need it)."""
    lines = [
        "| stage | directory | wall time (s) | CPU time (s) | load avg start → end | threads | this run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        load = r.manifest.get("load_average") or {}
        lines.append(
            f"| {r.label} | `{r.path.name}` | {r.seconds:.1f} | {_f(r.manifest.get('cpu_seconds'), 1)} | "
            f"{_f(load.get('start'), 2)} → {_f(load.get('end'), 2)} | {r.manifest.get('torch_threads', '–')} | "
            f"{'cached' if r.cached else 'ran'} |"
        )
    total = sum(r.seconds for r in results)
    lines.append(f"| **total** (as if run from scratch) | | {total:.1f} | | | | |")
    return lines


def summarize(pipe: Pipeline, done: dict[str, StageResult], wall_seconds: float, argv: list[str]) -> dict:
    """The final results (dict for results.json) and their markdown (`markdown` key)."""
    cfg = pipe.cfg
    oracle = done["oracle"].stats
    pairs = done["pairs"].stats
    tier = cfg.policy.tier
    rows = [model_row("SFT (reference)", done["evaluate_sft"])]
    method = f"{cfg.policy.name} (tier {tier}, seed {cfg.policy.seed})"
    rows.append(model_row(method, done["evaluate"]))
    sft_row, pol_row = rows
    compared = [
        model_row(f"{c.name} (same pairs, seed, hyperparameters)", done[f"evaluate:{c.name}"])
        for c in cfg.compared_policies()
    ]
    rows += compared
    gain = pol_row["mean"] - sft_row["mean"]
    separated = pol_row["ci95_low"] > sft_row["ci95_high"]
    lines = ["# MADPO offline IMDB pipeline: results", ""]
    lines += reward_table(rows)
    lines += [
        "",
        f"- **Gain over SFT: {gain:+.3f}**; the 95 % intervals "
        + ("do not overlap (policy above SFT)." if separated else "overlap or the policy is not above SFT."),
    ]
    differences = [
        difference(pol_row, c, cfg.policy.name, name) for c, name in zip(compared, cfg.compare_with, strict=True)
    ]
    for d in differences:
        lines.append(
            f"- **{d['policy']} − {d['other']}: {d['reward']:+.3f} ± {d['reward_se']:.3f}** mean oracle reward "
            f"(95 % CI [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}], independent samples on the same prompts; one "
            f"seed, so it holds the evaluation's sampling noise, not the seed-to-seed spread), KL "
            f"{'–' if d['kl'] is None else format(d['kl'], '+.2f')} nats."
        )
    lines += [
        f"- Oracle `{oracle.get('name')}`: accuracy {_f(oracle.get('heldout_accuracy'))} on "
        f"{oracle.get('n_heldout')} held-out reviews, {_f(oracle.get('snippet_accuracy'))} on their first "
        f"{oracle.get('snippet_tokens')} tokens (the length of the texts it scores).",
    ]
    t = pairs["tiers"][tier]["train"]
    lines.append(
        f"- Pairs, tier {tier}: {t['n']} train / {pairs['tiers'][tier]['eval']['n']} eval; labels disagree with the "
        f"oracle on {t['frac_disagree']:.1%} of train pairs; mean |oracle gap| {t['mean_abs_oracle_gap']:.2f}; "
        f"composition {t['composition']}."
    )
    if "reward" in done:
        rm = done["reward"].stats["metrics"]
        lines.append(
            f"- Reward model (tier {tier}): validation accuracy {_f(rm.get('val/accuracy'))} against the noisy labels "
            f"of {done['reward'].stats['n_val']} eval pairs."
        )
        if done["reward"].stats.get("quality"):  # reward stages from before the quality measures have none
            from madpo.pipeline.rm_quality import quality_line

            rm_stats = done["reward"].stats
            line = quality_line(rm_stats["quality"], rm_stats.get("tfidf_reference"))
            lines.append(f"- Reward-model quality on those pairs: {line}.")
    margins = done["policy"].stats.get("margins")
    if margins:
        lines.append(
            f"- Reward-model margins on the policy's training pairs: agree with the oracle on "
            f"{_f(margins.get('agrees_with_oracle'))}, sd {_f(margins.get('sd'))}; "
            f"{margins['frac_downweighted_negative'] + margins['frac_capped_below_minus_tau']:.1%} down-weighted "
            f"(m < 0), {margins['frac_amplified_0_to_tau']:.1%} amplified (0 < m < τ), "
            f"{margins['frac_damped_above_tau']:.1%} damped (m ≥ τ)."
        )
    pol = done["policy"].stats["metrics"]
    lines.append(
        f"- Policy validation: implicit-reward accuracy {_f(pol.get('val/rewards/accuracies'))}, "
        f"loss {_f(pol.get('val/loss'))}."
    )
    lines += ["", "## The same policy stage through `fit`", ""]
    pairs_dir = done["pairs"].path / "pairs" / tier
    fit_args = [
        "python cli.py fit -c configs/tiny/madpo.yaml",
        f"--model.init_args.model_name_or_path {done['sft'].output('model')}",
        f"--model.init_args.loss {shlex.quote(json.dumps(loss_config(cfg.policy.loss)))}",
        f"--model.init_args.optimizer.lr {cfg.policy.lr:g}",
        f"--data.train_files {pairs_dir / 'train.jsonl'} --data.val_files {pairs_dir / 'eval.jsonl'}",
        f"--data.max_length {cfg.pair_max_length} --data.max_prompt_length {cfg.max_prompt_length}",
    ]
    if "reward" in done:
        fit_args.append(f"--data.reward_model {done['reward'].output('model')}")
    lines += ["```", " \\\n    ".join(fit_args), "```"]
    lines += ["", "## Wall time per stage", ""]
    lines += stage_table(pipe.ctx.results)
    lines += [
        "",
        f"This run: {wall_seconds:.1f} s wall. Command: `python cli.py pipeline {shlex.join(argv)}`.",
        "",
        "## Examples (policy)",
        "",
        "| prompt | continuation | reward |",
        "|---|---|---|",
    ]
    for e in done["evaluate"].stats.get("examples", []):
        cont = " ".join(e["continuation"].split()).replace("|", "\\|")
        prompt = " ".join(e["prompt"].split()).replace("|", "\\|")
        lines.append(f"| {prompt} | {cont} | {e['reward']:.2f} |")
    markdown = "\n".join(lines) + "\n"
    return {
        "rows": rows,
        "gain_over_sft": gain,
        "differences": differences,
        "intervals_separated": bool(separated),
        "oracle": oracle,
        "pairs": {"tier": tier, "train": t, "eval": pairs["tiers"][tier]["eval"]},
        "stages": [
            {"stage": r.name, "label": r.label, "path": str(r.path), "seconds": r.seconds, "cached": r.cached}
            for r in pipe.ctx.results
        ],
        "wall_seconds": wall_seconds,
        "argv": argv,
        "config": cfg.to_dict(),
        "markdown": markdown,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the pipeline; returns the summary (also written to `<output_dir>/results.{md,json}`), or the stage
    results by name when `stop_after` ends it early."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    configure_logging()
    if cfg.trainer.num_threads:
        import torch

        torch.set_num_threads(cfg.trainer.num_threads)
    start = time.perf_counter()
    pipe = Pipeline(cfg)
    also = f" (and {', '.join(cfg.compare_with)} on the same pairs)" if cfg.compare_with else ""
    say(f"pipeline: output_dir={cfg.output_dir}, policy {cfg.policy.name} on tier {cfg.policy.tier}{also}")
    try:
        done = pipe.run()
    except StageError as e:
        say(f"FAILED: {e}")
        raise
    wall = time.perf_counter() - start
    if "evaluate" not in done:
        say(f"pipeline stopped after {cfg.stop_after} ({wall:.1f} s)")
        return {"stages": done}
    summary = summarize(pipe, done, wall, argv)
    out = Path(cfg.output_dir)
    atomic_write_text(out / "results.md", summary["markdown"])
    atomic_write_json(out / "results.json", {k: v for k, v in summary.items() if k != "markdown"})
    print()
    print(summary["markdown"])
    say(f"results written to {out / 'results.md'} and {out / 'results.json'} ({wall:.1f} s)")
    return summary


__all__ = [
    "build_parser",
    "difference",
    "main",
    "model_row",
    "parse_config",
    "reward_table",
    "stage_table",
    "summarize",
]
