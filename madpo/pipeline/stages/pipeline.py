"""The stages wired together for one `PipelineConfig`: each accessor builds its stage's frozen inputs from the
config sections and the upstream results, and runs (or finds cached) the stage once per instance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from madpo.pipeline.config import PipelineConfig, PolicyConfig
from madpo.pipeline.stages.base import Context, StageResult, TrainingSettings
from madpo.pipeline.stages.base_model import base_model_inputs, stage_base_model
from madpo.pipeline.stages.evaluate import EvaluateInputs, stage_evaluate
from madpo.pipeline.stages.oracle import OracleInputs, stage_oracle
from madpo.pipeline.stages.pairs import PairsInputs, pair_data, stage_pairs
from madpo.pipeline.stages.policy import PolicyInputs, policy_label, stage_policy
from madpo.pipeline.stages.reviews import ReviewsInputs, stage_reviews
from madpo.pipeline.stages.reward import RewardInputs, score_rm_margins, stage_reward
from madpo.pipeline.stages.sft import SftInputs, stage_sft
from madpo.pipeline.stages.tokenizer import TokenizerInputs, stage_tokenizer


class Pipeline:
    """The stages wired together for one `PipelineConfig`; each accessor runs (or finds cached) its stage once per
    instance. `bench/reproduce.py` calls `policy()` / `evaluate_policy()` with other `PolicyConfig`s on the same
    upstream stages."""

    def __init__(self, cfg: PipelineConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.ctx = Context(Path(cfg.output_dir), progress_bar=cfg.trainer.progress_bar)
        self.ctx.output_dir.mkdir(parents=True, exist_ok=True)
        self.training = TrainingSettings.of(cfg.trainer)
        """The trainer settings the training stages read (and hash)."""
        self._memo: dict[str, StageResult] = {}

    def _once(self, key: str, make: Callable[[], StageResult]) -> StageResult:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def lengths(self) -> tuple[int, int]:
        return self.cfg.max_prompt_length, self.cfg.pair_max_length

    @property
    def snippet_tokens(self) -> int:
        return self.cfg.oracle.snippet_tokens or self.cfg.data.prompt_tokens + self.cfg.pairs.max_new_tokens

    @property
    def accelerator(self) -> str:
        """The device sampling and evaluation run on follows the trainer's accelerator."""
        return self.cfg.trainer.accelerator

    def reviews(self) -> StageResult:
        return self._once("reviews", lambda: stage_reviews(self.ctx, ReviewsInputs.of(self.cfg.data)))

    def tokenizer(self) -> StageResult:
        return self._once(
            "tokenizer",
            lambda: stage_tokenizer(self.ctx, TokenizerInputs.of(self.cfg.base_model, self.reviews())),
        )

    def oracle(self) -> StageResult:
        return self._once(
            "oracle",
            lambda: stage_oracle(
                self.ctx,
                OracleInputs.of(
                    self.cfg.oracle, self.snippet_tokens, self.accelerator, self.reviews(), self.tokenizer()
                ),
            ),
        )

    def base_model(self) -> StageResult:
        return self._once(
            "base_model",
            lambda: stage_base_model(
                self.ctx, base_model_inputs(self.cfg.base_model, self.training, self.reviews(), self.tokenizer())
            ),
        )

    def sft(self) -> StageResult:
        return self._once(
            "sft",
            lambda: stage_sft(
                self.ctx,
                SftInputs(self.cfg.sft, self.cfg.data.prompt_tokens, self.training, self.reviews(), self.base_model()),
            ),
        )

    def pairs(self) -> StageResult:
        return self._once(
            "pairs",
            lambda: stage_pairs(
                self.ctx,
                PairsInputs(
                    self.cfg.pairs,
                    self.cfg.data.prompt_tokens,
                    self.cfg.oracle,
                    self.accelerator,
                    self.reviews(),
                    self.oracle(),
                    self.sft(),
                ),
            ),
        )

    def reward(self, tier: str) -> StageResult:
        return self._once(
            f"reward-{tier}",
            lambda: stage_reward(
                self.ctx,
                RewardInputs(self.cfg.reward, tier, *self.lengths, self.training, self.base_model(), self.pairs()),
            ),
        )

    def train_margins(self, tier: str) -> np.ndarray:
        """The tier's reward-model rm_margin = r(chosen) − r(rejected) on its training pairs, tokenized as the
        policy stage tokenizes them and scored into the same cache (float32 on the CPU, not under a Trainer)."""
        from madpo.modeling import load_tokenizer

        tok = load_tokenizer(self.sft().output("model"))
        train, _, _, _ = pair_data(self.pairs(), tier, 0, tok, self.lengths[0])
        scored, _ = score_rm_margins(self.ctx, self.reward(tier), tok, {"train": train}, self.lengths, under=None)
        return np.asarray(scored["train"]["rm_margin"], dtype=np.float64)

    def policy(self, cfg: PolicyConfig | None = None) -> StageResult:
        cfg = cfg or self.cfg.policy

        def make() -> StageResult:
            # a synthetic margin source (policy.margin_source oracle/random) needs no reward model: none is trained
            reward = self.reward(cfg.tier) if cfg.needs_reward_model else None
            inputs = PolicyInputs.of(cfg, self.lengths, self.training, self.sft(), self.pairs(), reward)
            return stage_policy(self.ctx, inputs, policy_label(cfg))

        return self._once(f"policy:{cfg!r}", make)

    def evaluate_model(self, model: StageResult) -> StageResult:
        sft = self.sft()
        inputs = EvaluateInputs(
            self.cfg.evaluate,
            self.cfg.n_eval_prompts,
            self.cfg.oracle,
            self.accelerator,
            model,
            None if model.path == sft.path else sft,
            self.oracle(),
            self.pairs(),
        )
        return stage_evaluate(self.ctx, inputs)

    def evaluate_sft(self) -> StageResult:
        return self._once("evaluate-sft", lambda: self.evaluate_model(self.sft()))

    def evaluate_policy(self, cfg: PolicyConfig | None = None) -> StageResult:
        model = self.policy(cfg)
        return self._once(f"evaluate:{model.path}", lambda: self.evaluate_model(model))

    def run(self) -> dict[str, StageResult]:
        """Every stage in order (up to `stop_after`); returns the results by stage name."""
        stop = self.cfg.stop_after
        steps: list[tuple[str, Callable[[], StageResult]]] = [
            ("reviews", self.reviews),
            ("tokenizer", self.tokenizer),
            ("oracle", self.oracle),
            ("base_model", self.base_model),
            ("sft", self.sft),
            ("pairs", self.pairs),
        ]
        if self.cfg.policy.needs_reward_model:
            steps.append(("reward", lambda: self.reward(self.cfg.policy.tier)))
        steps += [("policy", self.policy), ("evaluate_sft", self.evaluate_sft), ("evaluate", self.evaluate_policy)]
        for compared in self.cfg.compared_policies():  # after the main policy; `done` names them by method
            steps.append((f"policy:{compared.name}", lambda c=compared: self.policy(c)))
            steps.append((f"evaluate:{compared.name}", lambda c=compared: self.evaluate_policy(c)))
        if stop == "reward" and not self.cfg.policy.needs_reward_model:
            stop = "pairs"  # this method reads no reward model
        done: dict[str, StageResult] = {}
        for name, make in steps:
            done[name] = make()
            if stop is not None and name == stop:
                break
        return done
