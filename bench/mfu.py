"""Model FLOPs utilisation of madpo's policy DPO step on a GPU.

A SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536, vocabulary 49152, tied
embeddings; random init, no download) in bf16 runs the policy step madpo runs: one forward over the stacked
[chosen; rejected] rows with `madpo.modeling.sequence_logps` (LM head only at completion positions), the DPO loss of
`madpo.losses` against precomputed reference log-probs (no reference forward), backward, fused AdamW. The rows are
random tokens of one length (no padding), so the figure is the model's, not the data's.

FLOPs per step (PaLM appendix B / nanoGPT convention, attention counted without the causal half):
    6 * N_body * tokens  +  6 * d * V * completion_positions  +  12 * L * d_attn * T * tokens
with N_body the non-embedding parameters (the tied LM head is counted at the completion positions only, where madpo
applies it), tokens = 2 * pairs * T, d_attn = heads * head_dim. MFU = FLOPs per step / step time / peak dense bf16
FLOP/s of the card (table below, or `--peak-tflops`).

Usage:
    python bench/mfu.py                                  # GPU, bf16, 8 pairs x 1024 tokens (256 prompt)
    python bench/mfu.py --batch-size 16 --seq-len 512 --compile
    python bench/mfu.py --device cpu --tiny --steps 2    # smoke test (what CI runs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets. Matched in order against
# torch.cuda.get_device_name(): more specific names first ("A100" before "A10", "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("MI300X", 1307.0),
)

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}


@dataclass
class MfuResult:
    """One measurement."""

    device: str
    dtype: str
    shape: str
    params: int
    pairs: int
    seq_len: int
    prompt_len: int
    step_s: float
    tokens_per_s: float
    pairs_per_s: float
    tflops_per_step: float
    achieved_tflops: float
    peak_tflops: float | None
    mfu: float | None
    peak_memory_gb: float | None
    loss: float


def peak_tflops_for(device_name: str) -> float | None:
    """The table's dense bf16 peak for a device name, or None when the card is not listed."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def step_flops(config: Any, n_body: int, pairs: int, seq_len: int, prompt_len: int) -> float:
    """Model FLOPs of one policy step (forward + backward), see the module docstring."""
    rows = 2 * pairs
    tokens = rows * seq_len
    completion_positions = rows * (seq_len - prompt_len)
    d_attn = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    body = 6.0 * n_body * tokens
    head = 6.0 * config.hidden_size * config.vocab_size * completion_positions
    attention = 12.0 * config.num_hidden_layers * d_attn * seq_len * tokens
    return body + head + attention


def run(args: argparse.Namespace) -> MfuResult:
    """Build the model, time `args.steps` policy steps after `args.warmup` and return the figures."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from madpo.losses import dpo_losses
    from madpo.modeling import sequence_logps

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    shape = TINY if args.tiny else SMOLLM2_135M
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.compile:
        model.model = torch.compile(model.model)
    params = sum(p.numel() for p in model.parameters())
    n_body = params - model.get_input_embeddings().weight.numel()  # tied: the head shares the embedding
    if not config.tie_word_embeddings:
        n_body -= model.get_output_embeddings().weight.numel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type in ("cuda", "cpu"))

    rows, length = 2 * args.batch_size, args.seq_len
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.vocab_size, (rows, length), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    completion_mask[:, args.prompt_len :] = True
    ref = -float(length - args.prompt_len) * torch.log(torch.tensor(float(config.vocab_size)))
    ref_chosen = ref.expand(args.batch_size).to(device)
    ref_rejected = ref.expand(args.batch_size).to(device)

    def step() -> torch.Tensor:
        logps, _ = sequence_logps(model, input_ids, attention_mask, completion_mask)
        b = args.batch_size
        loss = dpo_losses(logps[:b], logps[b:], ref_chosen, ref_rejected, beta=0.1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            losses.append(step())
        sync()
        times.append((time.perf_counter() - start) / args.steps)
    step_s = statistics.median(times)
    flops = step_flops(config, n_body, args.batch_size, length, args.prompt_len)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops if args.peak_tflops else (peak_tflops_for(device_name) if device.type == "cuda" else None)
    achieved = flops / step_s / 1e12
    return MfuResult(
        device=device_name,
        dtype=args.dtype,
        shape="tiny" if args.tiny else "SmolLM2-135M",
        params=params,
        pairs=args.batch_size,
        seq_len=length,
        prompt_len=args.prompt_len,
        step_s=step_s,
        tokens_per_s=rows * length / step_s,
        pairs_per_s=args.batch_size / step_s,
        tflops_per_step=flops / 1e12,
        achieved_tflops=achieved,
        peak_tflops=peak,
        mfu=achieved / peak if peak else None,
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        loss=float(losses[-1]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None, help="default: bf16 (fp32 on CPU)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama instead of SmolLM2-135M (CPU smoke test)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (2x rows)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 1024; --tiny 64)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per row (default seq-len / 4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's peak dense bf16 TFLOP/s")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    if args.seq_len is None:
        args.seq_len = 64 if args.tiny else 1024
    if args.prompt_len is None:
        args.prompt_len = args.seq_len // 4
    if not 1 <= args.prompt_len < args.seq_len:
        parser.error("need 1 <= --prompt-len < --seq-len")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --device cpu --tiny for the smoke test")

    result = run(args)
    mfu = f"{100 * result.mfu:.1f}%" if result.mfu is not None else "n/a (pass --peak-tflops)"
    print(
        f"{result.shape} ({result.params / 1e6:.1f}M params) on {result.device}, {result.dtype}, "
        f"{result.pairs} pairs x {result.seq_len} tokens ({result.prompt_len} prompt)"
    )
    print(
        f"step {1e3 * result.step_s:.1f} ms | {result.tokens_per_s:,.0f} tokens/s | {result.pairs_per_s:.1f} pairs/s | "
        f"{result.achieved_tflops:.1f} TFLOP/s of {result.peak_tflops or '?'} | MFU {mfu}"
        + (f" | peak memory {result.peak_memory_gb:.1f} GiB" if result.peak_memory_gb is not None else "")
    )
    if args.json:
        from madpo.io import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args), "result": asdict(result)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
