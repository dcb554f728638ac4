"""Stage 9, `evaluate` <- the model (policy or SFT), sft (reference), oracle, pairs: oracle reward on held-out prompts
(docs/method.md eq. (38)), KL(policy‖SFT) on the same samples (eq. (39)), examples; results.json/.md and
TensorBoard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import madpo.pipeline.stages.oracle as oracle_stage
from madpo.pipeline.config import EvaluateConfig, OracleConfig
from madpo.pipeline.stages.base import (
    Context,
    StageInputs,
    StageOutput,
    StageResult,
    device_for,
    read_jsonl,
    run_stage,
    say,
)


@dataclass(frozen=True)
class EvaluateInputs(StageInputs):
    """The evaluate section, how many held-out prompts, the oracle section (to load the oracle), the sampling
    device's accelerator, the model, the SFT reference (None when the model is the SFT model itself), the oracle and
    the pairs (their held-out prompts)."""

    stage = "evaluate"
    cfg: EvaluateConfig
    n_prompts: int
    oracle_cfg: OracleConfig
    accelerator: str
    model: StageResult
    reference: StageResult | None
    oracle: StageResult
    pairs: StageResult

    @property
    def label(self) -> str:
        return "evaluate-sft" if self.reference is None else self.model.label.replace("policy-", "evaluate-", 1)


def evaluate_model(inputs: EvaluateInputs, path: Path, ctx: Context) -> StageOutput:
    from madpo.modeling import load_causal_lm, load_tokenizer
    from madpo.pipeline.evaluate import evaluate_policy, log_to_tensorboard, write_results

    cfg, device = inputs.cfg, device_for(inputs.accelerator)
    prompts = [r["prompt"] for r in read_jsonl(inputs.pairs.output("eval_prompts"))][: inputs.n_prompts]
    if not prompts:
        raise ValueError("no evaluation prompts")
    model_path = inputs.model.output("model")
    tok = load_tokenizer(model_path)
    policy = load_causal_lm(model_path, pad_token_id=tok.pad_token_id).to(device)
    reference = None
    if inputs.reference is not None:
        reference = load_causal_lm(inputs.reference.output("model"), pad_token_id=tok.pad_token_id).to(device)
    results = evaluate_policy(
        policy,
        reference,
        tok,
        oracle_stage.load_oracle(inputs.oracle, inputs.oracle_cfg, device),
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        n_examples=cfg.n_examples,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        device=device,
        progress=ctx.progress_bar,
    )
    if inputs.reference is None:
        results["kl"] = {"n": len(prompts), "mean": 0.0, "se": 0.0, "sd": 0.0, "note": "the reference itself"}
    results["model"] = inputs.model.label
    results["model_path"] = model_path
    results["oracle_snippet_accuracy"] = inputs.oracle.stats.get("snippet_accuracy")
    write_results(results, path)
    log_to_tensorboard(results, path / "tensorboard")
    r = results["reward"]
    say(
        f"{inputs.label}: mean oracle reward {r['mean']:.3f} ± {r['se']:.3f} (SE), 95 % CI "
        f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}], KL {results['kl']['mean']:.2f} nats, n={r['n']}"
    )
    return StageOutput({"results": "results.json", "results_md": "results.md"}, results)


def stage_evaluate(ctx: Context, inputs: EvaluateInputs) -> StageResult:
    """One sampled continuation per held-out prompt from the model, scored by the oracle (mean ± SE, 95 % CI), the
    KL to the SFT reference on the same samples (0 for the SFT model itself) and a few examples: results.json/.md in
    the stage dir and TensorBoard scalars + a text table."""
    return run_stage(ctx, inputs, evaluate_model, label=inputs.label)
