"""The offline IMDB pipeline's stages (docs/method.md §IMDB protocol): each a function of one frozen inputs object
and an output directory, cached.

A stage writes into `output_dir/<label>-<hash>`. The hash (blake2b) is that of the stage's inputs object, which holds
exactly what the stage reads: its config section, the trainer settings it uses (`TrainingSettings`, or the
accelerator for the sampling stages), derived values (prompt tokens, lengths, tier) and its upstream results, each
entering as its label and hash. So a change anywhere upstream re-runs everything below it and nothing else, and a
stage cannot read a setting its key lacks: its body receives only that object, the stage directory and the unhashed
`Context` (output directory, progress bars). The manifest `stage.json` (inputs, upstream hashes and paths, outputs,
statistics, wall time) is written LAST, through a temp file and a rename: a directory with a manifest is finished and
is skipped ("[madpo] stage X: cached"); a directory without one was interrupted and is wiped and redone.

Stages, in order (the arrows are their inputs), one module each:

1. `reviews`: the 25,000 IMDB reviews + the slices (prompts, SFT, oracle train/held-out).
2. `tokenizer` <- reviews: a byte-level BPE trained on the reviews, or the pretrained model's tokenizer.
3. `oracle` <- reviews, tokenizer: the sentiment oracle (TF-IDF trained here; eq. (34)), its held-out accuracy on
   full reviews and on review snippets as long as the texts it will score.
4. `base_model` <- reviews, tokenizer: a small Llama trained as a language model on the reviews
   (`madpo.losses.SFTLoss()` on prompt="" / completion=review), or the pretrained model as given.
5. `sft` <- reviews, base_model: SFT on positive reviews (completion-only NLL of eq. (31) after the first prompt
   tokens).
6. `pairs` <- reviews, oracle, sft: 2 samples per negative-review prompt, oracle scores, the three tiers, Gumbel
   labels (eq. (35)–(36)), train/eval split: `pairs/<tier>/{train,eval}.jsonl` (TRL format + oracle columns) and a
   report.
7. `reward` <- base_model, pairs (per tier): a Bradley–Terry reward model (eq. (21)).
   With `reward.warm_start`, `reward_warm_start` <- base_model (none with `reward.backbone`) first: BT on
   labelled sentiment pairs, trained once and continued from by every tier.
8. `policy` <- sft, pairs, reward (MADPO methods): the preference-optimised policy.
9. `evaluate` <- the model (policy or SFT), sft (reference), oracle, pairs: oracle reward on held-out prompts
   (eq. (38)), KL(policy‖SFT) (eq. (39)), examples; results.json/.md and TensorBoard.

`base` holds the bookkeeping (inputs and keys, manifests, caching, resumption), `training` the one training helper
every training stage uses (`fit`: `lightning.Trainer` with the library's LightningModules and
`PreferenceDataModule`), `pipeline` the wiring (`Pipeline`). Any exception inside a stage is re-raised as
`StageError("stage <name>: ...")`, keeping the row the cause names.
"""

from __future__ import annotations

from madpo.pipeline.stages.base import (
    MANIFEST,
    PIPELINE_VERSION,
    TRAINING_FIELDS,
    UNKEYED_TRAINER_FIELDS,
    Context,
    StageError,
    StageInputs,
    StageOutput,
    StageResult,
    TrainingSettings,
    check_prompt_lengths,
    device_for,
    read_jsonl,
    run_stage,
    say,
    stage_key,
    write_json_atomic,
    write_jsonl,
)
from madpo.pipeline.stages.base_model import (
    BaseModelInputs,
    PretrainedModelInputs,
    base_model_inputs,
    stage_base_model,
)
from madpo.pipeline.stages.evaluate import EvaluateInputs, stage_evaluate
from madpo.pipeline.stages.oracle import OracleInputs, load_oracle, stage_oracle
from madpo.pipeline.stages.pairs import PairsInputs, load_pairs, stage_pairs
from madpo.pipeline.stages.pipeline import Pipeline
from madpo.pipeline.stages.policy import Margins, PolicyInputs, policy_label, stage_policy
from madpo.pipeline.stages.reviews import ReviewsInputs, load_reviews, load_slices, stage_reviews
from madpo.pipeline.stages.reward import RewardInputs, margin_stats, score_rm_margins, stage_reward, with_rm_margin
from madpo.pipeline.stages.sft import SftInputs, stage_sft
from madpo.pipeline.stages.tokenizer import TokenizerInputs, stage_tokenizer
from madpo.pipeline.stages.training import fit, quiet_libraries

_with_rm_margin = with_rm_margin  # its former private name

__all__ = [
    "BaseModelInputs",
    "Context",
    "EvaluateInputs",
    "MANIFEST",
    "Margins",
    "OracleInputs",
    "PIPELINE_VERSION",
    "PairsInputs",
    "Pipeline",
    "PolicyInputs",
    "PretrainedModelInputs",
    "ReviewsInputs",
    "RewardInputs",
    "SftInputs",
    "StageError",
    "StageInputs",
    "StageOutput",
    "StageResult",
    "TRAINING_FIELDS",
    "TokenizerInputs",
    "TrainingSettings",
    "UNKEYED_TRAINER_FIELDS",
    "base_model_inputs",
    "check_prompt_lengths",
    "device_for",
    "fit",
    "load_oracle",
    "load_pairs",
    "load_reviews",
    "load_slices",
    "margin_stats",
    "policy_label",
    "quiet_libraries",
    "read_jsonl",
    "run_stage",
    "say",
    "score_rm_margins",
    "stage_base_model",
    "stage_evaluate",
    "stage_key",
    "stage_oracle",
    "stage_pairs",
    "stage_policy",
    "stage_reviews",
    "stage_reward",
    "stage_sft",
    "stage_tokenizer",
    "write_json_atomic",
    "with_rm_margin",
    "write_jsonl",
]
