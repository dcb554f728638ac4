"""The contenders of bench/throughput.py, one per subprocess: TRL's `DPOTrainer`, madpo as a user runs it, and the
plain PyTorch loop that is the floor."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import BenchConfig, Result, _load_pairs, _result


def run_trl(workdir: Path, cfg: BenchConfig, *, precompute: bool, gradient_checkpointing: bool = False) -> Result:
    """TRL's `DPOTrainer`, default configuration apart from the equal-work settings of the module docstring."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    times: dict[str, float] = {"precompute": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        times["precompute"] += time.perf_counter() - start
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute  # type: ignore[method-assign]
    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.setdefault("first", time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    model_dir = str(workdir / "model")
    train = datasets.Dataset.from_list(_load_pairs(workdir, ordered=True))
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-out-", dir=workdir),
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.total_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_epsilon=cfg.eps,
        max_grad_norm=0.0,
        bf16=False,
        gradient_checkpointing=gradient_checkpointing,
        max_length=cfg.max_length,
        beta=cfg.beta,
        precompute_ref_log_probs=precompute,
        logging_steps=cfg.loss_window,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        use_cpu=True,
        seed=cfg.seed,
        model_init_kwargs={"dtype": "float32"},
    )
    try:
        trainer = DPOTrainer(
            model=model_dir, args=args, train_dataset=train, processing_class=AutoTokenizer.from_pretrained(model_dir)
        )
        trainer.add_callback(StepTimer())
        trainer.train()
    finally:
        DPOTrainer._precompute_ref_logps = original  # type: ignore[method-assign]
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    result = _result(
        "trl_precompute" if precompute else "trl_default", cfg, marks, [], times["precompute"], t0, times["first"]
    )
    result.loss = losses[-1] if losses else float("nan")  # TRL logs the mean over the last `loss_window` steps
    result.losses = losses
    return result


def run_madpo(workdir: Path, cfg: BenchConfig, *, profile: bool = False, group_by_length: bool = False) -> Result:
    """madpo as a user runs it: `PolicyLightningModule(loss=DPOLoss())` + `PreferenceDataModule` +
    `lightning.Trainer`."""
    import datasets
    import lightning as L

    from madpo import PolicyLightningModule, PreferenceDataModule
    from madpo.losses import DPOLoss
    from madpo.modules.base import OptimizerOptions

    t0 = time.perf_counter()
    model_dir = str(workdir / "model")
    expected = json.loads((workdir / "order.json").read_text())
    marks: list[float] = []
    losses: list[Any] = []
    seen: list[int] = []
    times: dict[str, float] = {}

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
            times.setdefault("first", time.perf_counter())
            seen.extend(batch["index"].tolist())

        def on_train_batch_end(
            self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
        ) -> None:
            marks.append(time.perf_counter())
            losses.append(outputs["loss"].detach())

    module = PolicyLightningModule(
        model_name_or_path=model_dir,
        loss=DPOLoss(beta=cfg.beta),
        optimizer=OptimizerOptions(
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
            eps=cfg.eps,
            warmup_ratio=0.0,
            schedule="constant",
        ),
        export=False,
    )
    extra = {"group_by_length": True} if group_by_length else {}
    data = PreferenceDataModule.from_datasets(
        datasets.Dataset.from_list(_load_pairs(workdir, ordered=False)),
        tokenizer=model_dir,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        batch_size=cfg.batch_size,
        scoring_batch_size=cfg.scoring_batch_size,
        cache_dir=tempfile.mkdtemp(prefix="madpo-cache-", dir=workdir),  # cold cache every run
        seed=cfg.seed,
        **extra,
    )
    original = data._add_reference_logps

    def timed_precompute(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        original(*args, **kwargs)
        times["precompute"] = time.perf_counter() - start

    data._add_reference_logps = timed_precompute  # type: ignore[method-assign]
    callbacks: list[L.Callback] = [StepTimer()]
    profiler: Any = None
    if profile:
        from lightning.pytorch.profilers import SimpleProfiler

        profiler = SimpleProfiler()
        from .profiling import _torch_profile_callback  # profiling reads this module's plain loop

        callbacks.append(_torch_profile_callback(cfg))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=cfg.total_steps,
        default_root_dir=str(workdir / "madpo_runs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        profiler=profiler,
    )
    trainer.fit(module, datamodule=data)
    if profiler is not None:
        print(profiler.summary())
    if not group_by_length and seen[: len(expected)] != expected[: len(seen)]:
        raise RuntimeError("madpo trained on pairs in another order than the one given to TRL and the plain loop")
    name = "madpo_grouped" if group_by_length else "madpo"
    return _result(name, cfg, marks, [float(x) for x in losses], times.get("precompute", 0.0), t0, times["first"])


class _PlainBatches:
    """Right-padded [chosen; rejected] batches of pre-tokenised pairs (what any collator produces)."""

    def __init__(self, rows: list[dict[str, list[int]]], pad_id: int) -> None:
        self.rows, self.pad_id = rows, pad_id

    def collate(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
        starts = [len(r["prompt_ids"]) for r in rows] * 2
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        completion = torch.zeros((len(seqs), width), dtype=torch.bool)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, start) in enumerate(zip(seqs, starts, strict=True)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention[i, : len(s)] = 1
            completion[i, start : len(s)] = True
        return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def plain_completion_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Σ log p(completion tokens) per row: decoder once, LM head only at positions that predict a completion token."""
    import torch
    import torch.nn.functional as F

    input_ids, completion = batch["input_ids"], batch["completion_mask"]
    hidden = model.model(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
    target = completion[:, 1:]
    logits = model.lm_head(hidden[:, :-1][target])
    token_logps = -F.cross_entropy(logits, input_ids[:, 1:][target], reduction="none")
    rows = torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(target)[target]
    return torch.zeros(input_ids.shape[0]).index_add(0, rows, token_logps)


def run_plain(workdir: Path, cfg: BenchConfig) -> Result:
    """The floor: a hand-written loop over the same pairs, same order, same maths, fused AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model_dir = str(workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [tokenizer.eos_token_id]
    rows = [
        {"prompt_ids": ids(r["prompt"]), "chosen_ids": ids(r["chosen"]) + eos, "rejected_ids": ids(r["rejected"]) + eos}
        for r in _load_pairs(workdir, ordered=True)
    ]
    batches = _PlainBatches(rows, tokenizer.pad_token_id)
    # reference log-probs: one no-grad pass, longest pairs first
    start = time.perf_counter()
    model.eval()
    ref = torch.zeros(len(rows), 2)
    by_length = sorted(
        range(len(rows)),
        key=lambda i: -len(rows[i]["prompt_ids"]) - max(len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"])),
    )
    with torch.no_grad():
        for s in range(0, len(rows), cfg.scoring_batch_size):
            idx = by_length[s : s + cfg.scoring_batch_size]
            logps = plain_completion_logps(model, batches.collate([rows[i] for i in idx]))
            ref[idx] = torch.stack([logps[: len(idx)], logps[len(idx) :]], 1)
    precompute_s = time.perf_counter() - start
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=True,
    )
    marks: list[float] = []
    losses: list[Any] = []
    t_first = time.perf_counter()
    for step in range(cfg.total_steps):
        lo = (step * cfg.batch_size) % len(rows)
        batch = batches.collate(rows[lo : lo + cfg.batch_size])
        b = batch["input_ids"].shape[0] // 2
        logps = plain_completion_logps(model, batch)
        ref_c, ref_r = ref[lo : lo + b, 0], ref[lo : lo + b, 1]
        loss = -F.logsigmoid(cfg.beta * ((logps[:b] - ref_c) - (logps[b:] - ref_r))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        losses.append(loss.detach())
    return _result("plain", cfg, marks, [float(x) for x in losses], precompute_s, t0, t_first)
