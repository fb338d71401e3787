"""Speed of sliding-window attention (Triton) against torch SDPA full causal attention on one
GPU: forward and forward + backward, B = 1, bf16.

Two head settings: the local MLA layer (16 heads, DK = 192, DV = 128, KV per head) and a
GQA layer (64 query heads, 4 KV heads, head dim 128). Times are `triton.testing.do_bench`
medians. TFLOP/s count only the (query, key) pairs each op computes: the window's pairs
(the causal triangle of the first w queries excluded) for our kernel, all causal pairs for
SDPA; 2 FLOPs per multiply-add in QK^T and PV, the backward counted as 2.5x the forward.
TB/s is our kernel's compulsory traffic (`common.compulsory_bytes`) over its time, and
roofline % the share of the roofline time (FLOPs at peak or traffic at peak bandwidth,
whichever is longer) it reaches.

SDPA's flash backend needs equal q/k/v head dims, so for DK != DV it runs with V zero-padded
to DK (its FLOPs are still counted at the true DV); if the flash backend is not available,
torch picks a backend for the unpadded dims. The last column names what ran.

    python benchmarks/bench_window.py [--lengths 8192 16384] [--configs mla gqa] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass

import torch
import triton
from common import compulsory_bytes, fwd_and_fwd_bwd, roofline, sdpa_causal, timed

from nsa_kernels import sliding_window_attention
from nsa_kernels.flops import attention_flops, causal_pairs, window_pairs


@dataclass(frozen=True)
class Setting:
    name: str
    heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int


SETTINGS = {
    "mla": Setting("MLA local (16 heads, 192/128)", 16, 16, 192, 128),
    "gqa": Setting("GQA (64 q / 4 kv heads, 128/128)", 64, 4, 128, 128),
}


def bench_one(setting: Setting, seqlen: int, window: int) -> list[dict[str, object]]:
    """One row per pass (fwd, fwd+bwd): milliseconds, ratio and TFLOP/s of both ops, and
    our kernel's bandwidth and roofline share."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, seqlen, setting.heads, setting.qk_dim, device=device, dtype=dtype)
    k = torch.randn(1, seqlen, setting.kv_heads, setting.qk_dim, device=device, dtype=dtype)
    v = torch.randn(1, seqlen, setting.kv_heads, setting.v_dim, device=device, dtype=dtype)
    inputs = [x.requires_grad_() for x in (q, k, v)]

    ours = fwd_and_fwd_bwd(
        lambda: sliding_window_attention(q, k, v, window, backend="triton"), inputs
    )
    sdpa_forward, sdpa_inputs, sdpa_name = sdpa_causal(q, k, v)
    theirs = fwd_and_fwd_bwd(sdpa_forward, sdpa_inputs)

    dims = (setting.heads, setting.qk_dim, setting.v_dim)
    out = ours[0]().detach()
    rows = []
    for index, name in enumerate(("fwd", "fwd+bwd")):
        backward = name == "fwd+bwd"
        window_flops = attention_flops(window_pairs(seqlen, window), *dims, backward=backward)
        sdpa_flops = attention_flops(causal_pairs(seqlen), *dims, backward=backward)
        ms, sdpa_ms = timed(ours[index]), timed(theirs[index])
        traffic = compulsory_bytes(inputs, [out], backward)
        tbps, share = roofline(window_flops, traffic, ms)
        rows.append(
            {
                "pass": name,
                "window ms": ms,
                "SDPA ms": sdpa_ms,
                "SDPA / window": sdpa_ms / ms,
                "window TFLOP/s": window_flops / ms / 1e9,
                "SDPA TFLOP/s": sdpa_flops / sdpa_ms / 1e9,
                "window TB/s": tbps,
                "window roofline %": share,
                "SDPA backend": sdpa_name,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Time sliding-window attention against full causal SDPA (bf16, one GPU)."
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--configs", nargs="+", choices=sorted(SETTINGS), default=["mla", "gqa"])
    parser.add_argument("--out", help="also write the results as a markdown table to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_window.py needs a CUDA GPU")

    columns = ["window ms", "SDPA ms", "SDPA / window", "window TFLOP/s", "SDPA TFLOP/s",
               "window TB/s", "window roofline %"]
    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, Python {platform.python_version()}",
        "",
        f"B=1, bf16, window {args.window}; do_bench medians. TFLOP/s count the pairs each op "
        "computes (window pairs for ours, causal pairs for SDPA); backward = 2.5x forward.",
        "",
        "| setting | T | pass | " + " | ".join(columns) + " | SDPA backend |",
        "|" + "---|" * (len(columns) + 4),
    ]
    print("\n".join(lines), flush=True)
    for key in args.configs:
        setting = SETTINGS[key]
        for seqlen in args.lengths:
            for row in bench_one(setting, seqlen, args.window):
                cells = " | ".join(f"{row[c]:.2f}" for c in columns)
                line = (
                    f"| {setting.name} | {seqlen} | {row['pass']} | {cells} | "
                    f"{row['SDPA backend']} |"
                )
                lines.append(line)
                print(line, flush=True)
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
