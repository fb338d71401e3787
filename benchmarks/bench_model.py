"""Forward + backward of a ~350M-parameter GPT on one GPU: ASA (pattern "LG") next to dense
GQA attention (pattern "D"), same model otherwise, in one run.

Megatron-Core's GPTModel with the ASA layer specs, single-rank parallel_state over NCCL,
bf16, nsa_backend="triton"; hidden 1024, 24 layers, 16 heads, micro-batch 1. Prints the
step time (median over the timed steps) and the peak GPU memory of each model.

    python benchmarks/bench_model.py [--seq-length 16384] [--steps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import megatron.core
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module

from megatron_nsa import ASATransformerConfig, get_asa_decoder_block_spec

VOCAB = 32768
MODELS = {
    "ASA (LG)": dict(attention_pattern="LG"),
    "dense GQA (D)": dict(attention_pattern="D"),
}


def make_config(**overrides) -> ASATransformerConfig:
    fields = dict(
        num_layers=24,
        hidden_size=1024,
        ffn_hidden_size=4096,
        num_attention_heads=16,
        num_query_groups=4,
        kv_channels=64,
        q_lora_rank=None,
        kv_lora_rank=256,
        qk_head_dim=64,
        qk_pos_emb_head_dim=32,
        v_head_dim=64,
        global_num_latent_heads=2,
        global_kv_lora_rank=128,
        sliding_window_size=512,
        nsa_backend="triton",
        hidden_dropout=0.0,
        add_bias_linear=False,
        bf16=True,
        params_dtype=torch.bfloat16,
    )
    return ASATransformerConfig(**{**fields, **overrides})


def bench_one(seq_length: int, steps: int, **overrides) -> dict[str, float]:
    """Build one model, run warm-up and timed forward+backward steps; ms, GiB, parameters."""
    config = make_config(**overrides)
    model = GPTModel(
        config,
        get_asa_decoder_block_spec(config, use_transformer_engine=False),
        VOCAB,
        seq_length,
        position_embedding_type="rope",
    )
    params = sum(p.numel() for p in model.parameters())
    model = Float16Module(config, model)
    tokens = torch.randint(0, VOCAB, (1, seq_length), device="cuda")
    positions = torch.arange(seq_length, device="cuda")[None]

    def step() -> None:
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: Triton compilation, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "params M": params / 1e6,
        "fwd+bwd ms": statistics.median(times),
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--out", help="also write the results as a markdown table to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs a CUDA GPU")

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)

    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, megatron-core "
        f"{megatron.core.__version__}, Python {platform.python_version()}",
        "",
        f"GPTModel, hidden 1024, 24 layers, 16 heads, micro-batch 1 x {args.seq_length} tokens, "
        f"bf16, nsa_backend=triton; median of {args.steps} steps after one warm-up.",
        "",
        "| model | parameters (M) | fwd+bwd (ms) | peak memory (GiB) |",
        "|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name, overrides in MODELS.items():
        try:
            result = bench_one(args.seq_length, args.steps, **overrides)
            line = (
                f"| {name} | {result['params M']:.0f} | {result['fwd+bwd ms']:.1f} | "
                f"{result['peak GiB']:.2f} |"
            )
        except (RuntimeError, NotImplementedError) as error:  # e.g. out of memory
            line = f"| {name} | failed: {type(error).__name__}: {str(error)[:120]} | | |"
        torch.cuda.empty_cache()
        lines.append(line)
        print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
