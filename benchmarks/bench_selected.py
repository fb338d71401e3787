"""Speed of selected-block attention (Triton) against torch SDPA full causal attention on one
GPU: forward and forward + backward, B = 1, bf16, l' = 64, n = 16.

GQA/NSA layout with 64 query heads and G = 4, 8, 16 query heads per KV head (and per
selection head), head dims 128/128 unless changed. Selections follow NSA's rule: block 0 and
the two most recent blocks always, the rest drawn at random among the query's causal blocks
(`--share q` gives q consecutive queries one selection, as ASA's 4-query reuse does). The
time of our op includes its index preprocessing (tile unions, the inverse index).

Times are `triton.testing.do_bench` medians. TFLOP/s count only what each op computes: for
selected attention the (query, key) pairs inside the chosen blocks with key <= query, for
SDPA all causal pairs; 2 FLOPs per multiply-add in QK^T and PV, the backward 2.5x the
forward. `ratio` is SDPA time / selected time (above 1: selected attention is faster). TB/s
and roofline % as in bench_window.py (the block index counts as traffic too).

    python benchmarks/bench_selected.py [--lengths 8192 16384] [--groups 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
import triton
from common import compulsory_bytes, roofline, timed

from nsa_kernels import selected_attention
from nsa_kernels.flops import attention_flops, causal_pairs

BLOCK, TOP_N = 64, 16


def nsa_indices(
    seqlen: int, sel_heads: int, share: int, device: torch.device, chunk: int = 4096
) -> torch.Tensor:
    """[1, T, HI, n] int32: block 0, the two most recent blocks and random causal others,
    ascending, -1 padded; `share` consecutive queries reuse the first one's random draw."""
    gen = torch.Generator(device=device).manual_seed(0)
    num_blocks = triton.cdiv(seqlen, BLOCK)
    blocks = torch.arange(num_blocks, device=device)
    parts = []
    for start in range(0, seqlen, chunk):
        t = torch.arange(start, min(start + chunk, seqlen), device=device)
        cur = (t // BLOCK)[:, None, None]  # [C, 1, 1]
        group = t // share - start // share  # draw shared by `share` consecutive queries
        draws = torch.rand(int(group[-1]) + 1, sel_heads, num_blocks, generator=gen,
                           device=device)
        score = draws[group]  # [C, HI, M]
        recent = (blocks == 0) | (blocks == cur) | (blocks == cur - 1)
        score = score.masked_fill(recent, 2.0).masked_fill(blocks > cur, -1.0)
        top = score.topk(min(TOP_N, num_blocks), dim=-1)
        picked = torch.where(top.values >= 0, top.indices, num_blocks).sort(-1).values
        parts.append(torch.where(picked == num_blocks, -1, picked))
    return torch.cat(parts)[None].to(torch.int32)


def selected_pairs(indices: torch.Tensor) -> int:
    """(query, key) pairs with key <= query inside the chosen blocks, per selection head."""
    t = torch.arange(indices.shape[1], device=indices.device)[None, :, None, None]
    keys = (t - indices.long() * BLOCK + 1).clamp(0, BLOCK)
    return int(torch.where(indices >= 0, keys, 0).sum())


def bench_one(seqlen: int, group: int, heads: int, dims: tuple[int, int], share: int
              ) -> dict[str, float]:
    device = torch.device("cuda")
    kv_heads = heads // group
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=gen)
        return x.requires_grad_()

    q = randn(1, seqlen, heads, dims[0])
    k, v = randn(1, seqlen, kv_heads, dims[0]), randn(1, seqlen, kv_heads, dims[1])
    indices = nsa_indices(seqlen, kv_heads, share, device)
    do = torch.randn(1, seqlen, heads, dims[1], device=device, dtype=torch.bfloat16)

    def slc_fwd() -> torch.Tensor:
        return selected_attention(q, k, v, indices, BLOCK, backend="triton")

    def slc_fwd_bwd() -> None:
        torch.autograd.grad(slc_fwd(), (q, k, v), do)

    # SDPA on [B, H, T, D] leaves with KV heads expanded (its flash backend wants equal dims).
    sq = q.detach().transpose(1, 2).contiguous().requires_grad_()
    sk, sv = (x.detach().repeat_interleave(group, 2).transpose(1, 2).contiguous()
              .requires_grad_() for x in (k, v))
    sdo = do.transpose(1, 2).contiguous()

    def sdpa_fwd() -> torch.Tensor:
        return F.scaled_dot_product_attention(sq, sk, sv, is_causal=True)

    def sdpa_fwd_bwd() -> None:
        torch.autograd.grad(sdpa_fwd(), (sq, sk, sv), sdo)

    out = slc_fwd().detach()
    pairs = selected_pairs(indices) * group
    dense = causal_pairs(seqlen) * heads
    result = {}
    for name, slc, sdpa, backward in (
        ("fwd", slc_fwd, sdpa_fwd, False), ("fwd+bwd", slc_fwd_bwd, sdpa_fwd_bwd, True)
    ):
        ms, sdpa_ms = timed(slc), timed(sdpa)
        result[f"{name} ms"] = ms
        result[f"SDPA {name} ms"] = sdpa_ms
        result[f"{name} ratio"] = sdpa_ms / ms
        flops = attention_flops(pairs, 1, *dims, backward)
        result[f"{name} TFLOP/s"] = flops / ms / 1e9
        traffic = compulsory_bytes([q, k, v], [out], backward, index=[indices])
        result[f"{name} TB/s"], result[f"{name} roofline %"] = roofline(flops, traffic, ms)
        result[f"SDPA {name} TFLOP/s"] = attention_flops(dense, 1, *dims, backward) / sdpa_ms / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Time selected attention against SDPA causal attention (bf16, one GPU)."
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16],
                        help="query heads per KV (and selection) head")
    parser.add_argument("--heads", type=int, default=64, help="query heads")
    parser.add_argument("--dims", type=int, nargs=2, default=[128, 128], metavar=("DK", "DV"))
    parser.add_argument("--share", type=int, default=1,
                        help="consecutive queries that share one selection")
    parser.add_argument("--out", help="also write the results as a markdown table to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_selected.py needs a CUDA GPU")

    columns = ["fwd ms", "SDPA fwd ms", "fwd ratio", "fwd TFLOP/s", "SDPA fwd TFLOP/s",
               "fwd TB/s", "fwd roofline %", "fwd+bwd ms", "SDPA fwd+bwd ms", "fwd+bwd ratio",
               "fwd+bwd TFLOP/s", "SDPA fwd+bwd TFLOP/s", "fwd+bwd TB/s", "fwd+bwd roofline %"]
    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, Python {platform.python_version()}",
        "",
        f"B=1, bf16, {args.heads} query heads, head dims {args.dims[0]}/{args.dims[1]}, "
        f"l'={BLOCK}, n={TOP_N}, {args.share} queries per selection; do_bench medians; "
        "ratio = SDPA / selected.",
        "",
        "| G | T | " + " | ".join(columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    print("\n".join(lines), flush=True)
    for group in args.groups:
        for seqlen in args.lengths:
            result = bench_one(seqlen, group, args.heads, tuple(args.dims), args.share)
            torch.cuda.empty_cache()
            cells = " | ".join(f"{result[c]:.2f}" for c in columns)
            line = f"| {group} | {seqlen} | {cells} |"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
