"""Context parallelism on two GPUs: exactness in bf16, then per-layer speed at long context.

1. Check (`--check-length`, default 16384): a 2-layer "LG" GPTModel (Megatron-Core, ASA
   specs, nsa_backend="triton") runs the same batch at CP=1 and at CP=2 in bf16. Per-token
   losses and every parameter gradient (summed over the CP ranks) are compared; the CP=2 error
   against CP=1 must stay within twice the bf16 error of CP=1 against an fp32 run (plus a
   floor), since CP only changes where each op's tiles start.
2. Speed: forward + backward of one attention layer (its projections included) on
   [T / CP, 1, hidden] bf16 hidden states, for the local ("L"), global ("G") and dense ("D",
   full causal GQA through SDPA, keys and values all-gathered under CP) layers, at each of
   `--lengths` with CP=1 (each GPU runs the whole sequence) and CP=2. Reports the median over
   `--steps` steps after warm-up (the slower rank) and the bytes each rank sent per step.

    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py \
        [--check-length 16384] [--lengths 65536 131072 262144] [--steps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import megatron.core
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import build_module

from megatron_nsa import ASATransformerConfig, get_asa_decoder_block_spec, get_asa_layer_spec
from megatron_nsa.compat import get_batch_on_this_cp_rank
from megatron_nsa.context_parallel import ContextParallelLayout, bytes_sent

VOCAB = 32768
KINDS = {"L": "local (MLA window)", "G": "global (GLA cmp+slc)", "D": "dense GQA (SDPA)"}


def make_config(cp: int, dtype: torch.dtype = torch.bfloat16, **overrides) -> ASATransformerConfig:
    """hidden 1024, 16 heads (4 GQA groups for D), MLA latent 256, 2 GLA latent heads of 128,
    window 512, NSA blocks l=32, s=16, l'=64, n=16."""
    fields = dict(
        num_layers=2,
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
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        context_parallel_size=cp,
    )
    return ASATransformerConfig(**{**fields, **overrides})


def set_layout(cp: int) -> None:
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


# --- 1. exactness ---------------------------------------------------------------------------


def run_model(cp: int, dtype: torch.dtype, weights: dict | None, tokens: torch.Tensor):
    """(per-token loss [T] in global order, gradients summed over the CP group, weights)."""
    set_layout(cp)
    config = make_config(cp, dtype)
    torch.manual_seed(0)
    model = GPTModel(
        config, get_asa_decoder_block_spec(config, use_transformer_engine=False), VOCAB,
        tokens.shape[1], position_embedding_type="rope",
    )
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor)}
    wrapped = Float16Module(config, model) if dtype == torch.bfloat16 else model
    group = parallel_state.get_context_parallel_group()
    layout = ContextParallelLayout.of_rank(cp, group.rank(), tokens.shape[1])
    labels = torch.roll(tokens, -1, 1)
    if cp > 1:
        local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels}, group)
    else:
        local = {"tokens": tokens, "labels": labels}
    positions = torch.arange(tokens.shape[1] // cp, device="cuda")[None]
    losses = wrapped(local["tokens"], positions, None, labels=local["labels"]).float()
    (losses.sum() / tokens.numel()).backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.float()
        dist.all_reduce(grad, group=group)
        grads[name] = grad
    gathered = [torch.empty_like(losses) for _ in range(cp)]
    dist.all_gather(gathered, losses.contiguous(), group=group)
    full = torch.empty(tokens.shape[1], device="cuda")
    for rank, part in enumerate(gathered):
        index = ContextParallelLayout.of_rank(cp, rank, tokens.shape[1]).local_indices("cuda")
        full[index] = part[0]
    assert torch.equal(full[layout.local_indices("cuda")], losses[0])
    return full, grads, weights


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(length: int) -> list[str]:
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, length), device="cuda")
    loss32, grads32, weights = run_model(1, torch.float32, None, tokens)
    loss1, grads1, _ = run_model(1, torch.bfloat16, weights, tokens)
    loss2, grads2, _ = run_model(2, torch.bfloat16, weights, tokens)
    rows = [
        f"Check at T={length}, bf16, nsa_backend=triton: relative L2 error",
        "",
        "| tensor | CP=2 vs CP=1 (bf16) | CP=1 bf16 vs fp32 | within 2x + 1e-3 |",
        "|---|---|---|---|",
    ]
    failed = 0
    for name in ["per-token loss", *grads1]:
        if name == "per-token loss":
            cp_err, ref_err = relative_error(loss2, loss1), relative_error(loss1, loss32)
        else:
            cp_err = relative_error(grads2[name], grads1[name])
            ref_err = relative_error(grads1[name], grads32[name])
        ok = cp_err <= 2 * ref_err + 1e-3
        failed += not ok
        rows.append(f"| {name} | {cp_err:.2e} | {ref_err:.2e} | {'yes' if ok else 'NO'} |")
    rows += ["", f"{'all within' if not failed else f'{failed} tensors outside'} the bound", ""]
    return rows


# --- 2. speed -------------------------------------------------------------------------------


def time_layer(kind: str, length: int, cp: int, steps: int) -> tuple[float, int]:
    """(median fwd+bwd ms of the slower rank, bytes this rank sent per step)."""
    set_layout(cp)
    config = make_config(cp, num_layers=1, attention_pattern=kind)
    spec = get_asa_layer_spec(config, kind, use_transformer_engine=False)
    layer = build_module(spec.submodules.self_attention, config=config, layer_number=1)
    hidden = torch.randn(length // cp, 1, config.hidden_size, device="cuda",
                         dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(hidden)

    def step() -> None:
        out, _ = layer(hidden)
        out.backward(grad)

    for _ in range(3):  # warm-up: compilation, allocator
        step()
    bytes_sent.clear()
    step()
    sent = sum(bytes_sent.values())
    times = []
    for _ in range(steps):  # the same number of steps on every rank: collectives must match
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    slowest = torch.tensor(statistics.median(times), device="cuda")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item(), sent


def speed(lengths: list[int], steps: int) -> list[str]:
    rows = [
        "Forward + backward of one attention layer (projections included), bf16, median of "
        f"{steps} steps, slower rank; MB = bytes each rank sent per step.",
        "",
        "| layer | T | CP=1 ms | CP=2 ms | speed-up | CP=2 MB sent |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in KINDS.items():
        for length in lengths:
            try:
                one, _ = time_layer(kind, length, 1, steps)
                two, sent = time_layer(kind, length, 2, steps)
                rows.append(
                    f"| {label} | {length // 1024}k | {one:.1f} | {two:.1f} | {one / two:.2f}x "
                    f"| {sent / 2**20:.1f} |"
                )
            except torch.cuda.OutOfMemoryError:
                rows.append(f"| {label} | {length // 1024}k | out of memory | | | |")
            torch.cuda.empty_cache()
            if dist.get_rank() == 0:
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-length", type=int, default=16384)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 262144])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", help="also write the results as markdown to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_context_parallel.py needs CUDA GPUs")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    if dist.get_world_size() != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2")

    lines = [
        f"GPUs: 2 x {torch.cuda.get_device_name()}, torch {torch.__version__}, megatron-core "
        f"{megatron.core.__version__}, Python {platform.python_version()}",
        "",
    ]
    lines += check(args.check_length)
    if dist.get_rank() == 0:
        print("\n".join(lines), flush=True)
    lines += speed(args.lengths, args.steps)
    if dist.get_rank() == 0 and args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
