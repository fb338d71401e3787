"""Speed of the compression branch on one GPU: compressed attention (forward, forward +
backward) and block selection, B = 1, bf16, 64 query heads, 4 KV heads, head dim 128.

Two block settings: fla's NSA configuration (l = s = 64, l' = 64, n = 16) and the ASA
defaults (l = 32, s = 16, l' = 64, n = 16). Selection gets the LSE of compressed attention,
as `nsa_attention` passes it. Times are `triton.testing.do_bench` medians; TFLOP/s count the
matrix products over visible (query, compressed block) pairs only: forward S and PV, backward
S, dP, dV, dQ and dK, selection S. TB/s and roofline % as in bench_window.py: compulsory
traffic over time, and the share of the roofline time reached.

    python benchmarks/bench_compressed.py [--lengths 8192 16384] [--configs asa] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass

import torch
import triton
from common import compulsory_bytes, roofline, timed

from nsa_kernels import compressed_attention, num_compressed_blocks, select_blocks
from nsa_kernels.flops import attention_flops, compressed_pairs


@dataclass(frozen=True)
class Setting:
    name: str
    block_size: int  # l
    stride: int  # s
    select_block_size: int  # l'
    top_n: int


SETTINGS = {
    "fla": Setting("fla (l=s=64, l'=64, n=16)", 64, 64, 64, 16),
    "asa": Setting("ASA defaults (l=32, s=16, l'=64, n=16)", 32, 16, 64, 16),
}
HEADS, KV_HEADS, DIM = 64, 4, 128


def bench_one(setting: Setting, seqlen: int) -> dict[str, float]:
    """Milliseconds, TFLOP/s, TB/s and roofline share of forward, forward+backward and
    selection at one length."""
    device = torch.device("cuda")
    num_cmp = num_compressed_blocks(seqlen, setting.block_size, setting.stride)
    q = torch.randn(1, seqlen, HEADS, DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, num_cmp, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, num_cmp, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    blocks = (setting.block_size, setting.stride)

    def forward():
        return compressed_attention(q, k, v, *blocks, backend="triton")

    o, lse = forward()
    do = torch.randn_like(o)

    def forward_backward():
        out, _ = forward()
        torch.autograd.grad(out, (q, k, v), do)

    lse = lse.detach()

    def select():
        return select_blocks(
            q.detach(), k.detach(), *blocks, setting.select_block_size, setting.top_n,
            lse=lse, backend="triton",
        )

    pairs = compressed_pairs(seqlen, *blocks) * HEADS
    flops = {
        "fwd": attention_flops(pairs, 1, DIM, DIM),
        "fwd+bwd": attention_flops(pairs, 1, DIM, DIM, backward=True),
        "select": 2 * pairs * DIM,
    }
    outputs = [o.detach(), lse]
    traffic = {
        "fwd": compulsory_bytes([q, k, v], outputs, backward=False),
        "fwd+bwd": compulsory_bytes([q, k, v], outputs, backward=True),
        "select": compulsory_bytes([q, k, lse], [select()], backward=False),
    }
    result = {}
    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward), ("select", select)):
        ms = timed(fn)
        result[f"{name} ms"] = ms
        result[f"{name} TFLOP/s"] = flops[name] / ms / 1e9
        result[f"{name} TB/s"], result[f"{name} roofline %"] = roofline(
            flops[name], traffic[name], ms
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Time compressed attention and block selection (Triton, bf16, one GPU)."
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(SETTINGS), default=["fla", "asa"])
    parser.add_argument("--out", help="also write the results as a markdown table to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_compressed.py needs a CUDA GPU")

    columns = [f"{name} {unit}" for name in ("fwd", "fwd+bwd", "select")
               for unit in ("ms", "TFLOP/s", "TB/s", "roofline %")]
    header = "| setting | T | N | " + " | ".join(columns) + " |"
    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, Python {platform.python_version()}",
        "",
        f"B=1, bf16, {HEADS} query heads, {KV_HEADS} KV heads, head dim {DIM}; "
        "do_bench medians.",
        "",
        header,
        "|" + "---|" * (len(columns) + 3),
    ]
    print("\n".join(lines), flush=True)
    for key in args.configs:
        setting = SETTINGS[key]
        for seqlen in args.lengths:
            result = bench_one(setting, seqlen)
            torch.cuda.empty_cache()
            num_cmp = num_compressed_blocks(seqlen, setting.block_size, setting.stride)
            cells = " | ".join(f"{result[c]:.2f}" for c in columns)
            line = f"| {setting.name} | {seqlen} | {num_cmp} | {cells} |"
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
