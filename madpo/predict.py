"""`python cli.py predict`: sample one completion per prompt from the policy, score it, write JSONL, summarise.

Each row of the output (`<log_dir>/predictions.jsonl` unless `--predictions.path` says otherwise), in the order of
the prompt file(s):

- `index` (row of the prompt files), `prompt` (as given: text or chat messages), `completion` (decoded, without
  special tokens) and `completion_ids` (the sampled token ids, EOS included where sampled: the text need not
  tokenize back to them);
- `n_tokens`, `eos` (whether the completion ended with EOS rather than at `max_new_tokens`);
- `policy_logp` = log π(y|x) and `reference_logp` = log π_ref(y|x), summed over the completion tokens
  (`madpo.modeling.sequence_logps`), and `log_ratio` = their difference;
- `reward` = r(x, y) of `--data.reward_model`, when one is given.

The printed KL is the Monte-Carlo estimate mean(log_ratio) ± SE over the prompts: KL(π‖π_ref) when the completions
were sampled from π itself (temperature 1, top_k 0, top_p 1, the defaults). The reference is the initial policy:
with a fresh LoRA adapter the policy with its adapter disabled, otherwise the model at `model_name_or_path` (plus a
loaded, trained-on adapter), loaded once; a checkpoint given with `--ckpt_path` only changes the policy.

Under DDP each rank samples its share of the prompts (every world-th); `PredictionWriter` gathers them and rank 0
writes one file in prompt order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn

from madpo.data.collate import PreferenceCollator
from madpo.distributed import all_gather_object, barrier
from madpo.errors import UserError
from madpo.io import atomic_write_jsonl
from madpo.modeling import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    pair_rewards,
    sequence_logps,
    tokenizer_fingerprint,
)
from madpo.pipeline.generate import _eos_ids, _left_pad, decode_continuation
from madpo.serialize import format_mean_se

PREDICTIONS_FILE = "predictions.jsonl"


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling options of `predict` (one completion per prompt). The defaults sample the policy itself, so the
    printed KL estimate is unbiased; a lower temperature, top_k or top_p sample a sharpened policy instead.

    Args:
        max_new_tokens: Most tokens sampled per completion (fewer when the policy emits EOS).
        temperature: Softmax temperature of sampling.
        top_k: Sample from the k most likely tokens only (0: all tokens).
        top_p: Nucleus sampling: the smallest set of tokens with this total probability (1: all tokens).
        do_sample: False: greedy decoding (temperature, top_k and top_p unused).
        seed: Each batch is sampled with seed + the index of its first prompt: the same seed, prompts and
            eval_batch_size give the same completions (with eval_batch_size 1, for any number of processes).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                "generation options: need max_new_tokens >= 1, temperature > 0, top_k >= 0 and 0 < top_p <= 1; got "
                f"{self.max_new_tokens}, {self.temperature}, {self.top_k}, {self.top_p}"
            )


@dataclass
class PredictionModels:
    """What the predict steps use besides the policy. `reference` None: the policy with its adapter disabled."""

    tokenizer: Any
    reference: nn.Module | None
    reward_model: nn.Module | None = None


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def load_prediction_models(module: Any) -> PredictionModels:
    """The tokenizer (the DataModule's, which tokenized the prompts), the reference and the reward model, on the
    policy's device. Called after a checkpoint is restored, so the reference comes from disk, not from the policy."""
    h = module.hparams
    trainer = module.trainer
    datamodule = getattr(trainer, "datamodule", None)
    tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(
        h.model_name_or_path, trust_remote_code=h.trust_remote_code
    )
    device, dtype = module.device, _float_dtype(module.model)
    if module._reference_disables_adapter:
        reference = None
    elif module._online_reference:  # reference: online keeps a copy of the initial policy, made before the restore
        reference = module._online_reference_model()
    else:
        reference = load_causal_lm(
            h.model_name_or_path,
            dtype=h.dtype,
            trust_remote_code=h.trust_remote_code,
            pad_token_id=tokenizer.pad_token_id,
        )
        if module.lora is not None and module.lora.adapter_path:  # a loaded adapter that trained on: initial policy
            from peft import PeftModel

            reference = PeftModel.from_pretrained(reference, module.lora.adapter_path).merge_and_unload()
        reference = reference.to(device=device, dtype=dtype).eval().requires_grad_(False)
    path = datamodule.hparams.get("reward_model") if hasattr(datamodule, "hparams") else None
    reward_model = None
    if path is not None:
        rm_tokenizer = load_tokenizer(path, trust_remote_code=h.trust_remote_code)
        if tokenizer_fingerprint(rm_tokenizer) != tokenizer_fingerprint(tokenizer):
            raise UserError(
                f"the reward model's tokenizer ({path}) differs from the policy's: it would score token ids it was not "
                "trained on"
            )
        reward_model = load_reward_model(path, trust_remote_code=h.trust_remote_code)
        reward_model = reward_model.to(device).eval().requires_grad_(False)
    return PredictionModels(tokenizer, reference, reward_model)


def sample_completion_ids(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    options: GenerationOptions,
    *,
    seed: int,
) -> list[list[int]]:
    """One sampled completion per prompt (token ids, cut after the first EOS, which is kept), seeded inside
    `torch.random.fork_rng` so the caller's random state is untouched."""
    device = next(model.parameters()).device
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(p) for p in prompt_ids)
    if limit and longest + options.max_new_tokens > limit:
        raise UserError(
            f"a prompt of {longest} tokens plus max_new_tokens={options.max_new_tokens} exceeds the model's "
            f"max_position_embeddings={limit}: lower --data.max_prompt_length or the generation's max_new_tokens"
        )
    pad_id = tokenizer.pad_token_id
    eos_ids = _eos_ids(model, tokenizer)
    ids, mask = _left_pad([list(p) for p in prompt_ids], pad_id)
    if options.do_sample:
        knobs = {"do_sample": True, "temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p}
    else:
        knobs = {"do_sample": False}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=options.max_new_tokens,
            pad_token_id=pad_id,
            **knobs,
        )[:, ids.shape[1] :].tolist()
    out = []
    for seq in generated:  # generation pads after the first EOS; without one every token was sampled
        stop = next((t for t, tok in enumerate(seq) if tok in eos_ids), None)
        out.append(seq if stop is None else seq[: stop + 1])
    return out


def predict_batch(
    policy: nn.Module,
    batch: dict[str, Any],
    models: PredictionModels,
    options: GenerationOptions,
    *,
    fast_logps: bool = True,
) -> list[dict[str, Any]]:
    """The output rows of one batch of prompts (`madpo.data.collate.collate_prompts`)."""
    tokenizer = models.tokenizer
    index = batch["index"].tolist()
    completions = sample_completion_ids(policy, tokenizer, batch["prompt_ids"], options, seed=options.seed + index[0])
    device = next(policy.parameters()).device
    rows = [
        {"index": i, "prompt_ids": p, "chosen_ids": c}
        for i, p, c in zip(index, batch["prompt_ids"], completions, strict=True)
    ]
    seqs = {k: v.to(device) for k, v in PreferenceCollator(tokenizer.pad_token_id)(rows).items() if k != "index"}
    args = (seqs["input_ids"], seqs["attention_mask"], seqs["completion_mask"])
    policy_logps, n_tokens = sequence_logps(policy, *args, fast=fast_logps)
    if models.reference is None:
        with policy.disable_adapter():
            reference_logps, _ = sequence_logps(policy, *args, fast=fast_logps)
    else:
        reference_logps, _ = sequence_logps(models.reference, *args, fast=fast_logps)
    rewards = pair_rewards(models.reward_model, *args[:2]).tolist() if models.reward_model is not None else None
    eos_ids = _eos_ids(policy, tokenizer)
    out = []
    for j, (i, prompt, ids) in enumerate(zip(index, batch["prompt"], completions, strict=True)):
        policy_logp, reference_logp = float(policy_logps[j]), float(reference_logps[j])
        row = {
            "index": i,
            "prompt": prompt,
            "completion": decode_continuation(tokenizer, ids),
            "completion_ids": ids,
            "n_tokens": int(n_tokens[j]),
            "eos": bool(ids) and ids[-1] in eos_ids,
            "policy_logp": policy_logp,
            "reference_logp": reference_logp,
            "log_ratio": policy_logp - reference_logp,
        }
        if rewards is not None:
            row["reward"] = float(rewards[j])
        out.append(row)
    return out


def merge_predictions(per_rank: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of every rank in prompt order, each prompt once (a sampler that pads would repeat some)."""
    merged: dict[int, dict[str, Any]] = {}
    for rows in per_rank:
        for row in rows:
            merged.setdefault(int(row["index"]), row)
    return [merged[i] for i in sorted(merged)]


def summarize_predictions(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """n, the KL estimate (mean ± SE of log_ratio), the reward model's mean ± SE (None without one), mean tokens."""
    from madpo.pipeline.evaluate import reward_summary  # imports the oracle stack: only when predict runs

    if not rows:
        return {"n": 0, "kl": None, "reward": None, "mean_tokens": None}
    has_reward = all("reward" in r for r in rows)
    return {
        "n": len(rows),
        "kl": reward_summary([r["log_ratio"] for r in rows]),
        "reward": reward_summary([r["reward"] for r in rows]) if has_reward else None,
        "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
    }


def format_summary(summary: dict[str, Any], path: str) -> str:
    def pm(stats: dict[str, Any]) -> str:
        return format_mean_se(stats["mean"], stats["se"], 6, missing="n/a")

    lines = [f"[madpo] predict: n={summary['n']} completions written to {path}"]
    if summary["n"]:
        if summary["reward"] is not None:
            lines.append(f"[madpo]   reward model score: {pm(summary['reward'])}")
        lines.append(
            f"[madpo]   KL(policy‖reference): {pm(summary['kl'])} nats (mean log π(y|x) − log π_ref(y|x) over the "
            f"samples; {summary['mean_tokens']:.1f} tokens on average)"
        )
    return "\n".join(lines)


def write_jsonl(rows: Sequence[dict[str, Any]], path: str) -> None:
    atomic_write_jsonl(path, rows)  # a reader never sees half a file


class PredictionWriter(BasePredictionWriter):
    """Writes what `predict` sampled as one JSONL file (rows in prompt order, gathered from every rank) and prints
    n, the reward model's mean score and the KL estimate, each ± SE.

    Args:
        path: Output file (default: <log_dir>/predictions.jsonl).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path
        self.output_path: str | None = None
        self.summary: dict[str, Any] | None = None

    def write_on_epoch_end(
        self, trainer: Any, pl_module: Any, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        if predictions and predictions[0] and not isinstance(predictions[0][0], dict):  # several dataloaders
            predictions = [batch for loader in predictions for batch in loader]
        rows = [row for batch in predictions for row in batch]
        # trainer.log_dir broadcasts from rank 0: every rank asks, so no rank waits for the others
        path = self.path or os.path.join(trainer.log_dir or trainer.default_root_dir, PREDICTIONS_FILE)
        gathered = all_gather_object(rows)
        if trainer.is_global_zero:
            merged = merge_predictions(gathered)
            write_jsonl(merged, path)
            self.output_path, self.summary = path, summarize_predictions(merged)
            print(format_summary(self.summary, path))
        barrier()
