"""Speed of the whole global layer's attention (compression + top-n + selection, gated)
against full causal attention through torch SDPA and, on its own configuration, against
flash-linear-attention's `parallel_nsa`: one GPU, B = 1, bf16, forward and forward+backward.

Settings:
- `fla`: fla's config, 64 query heads, 4 KV heads, dim 128, mean pooling with
  l = s = l' = 64, n = 16, no window; both sides pool K and V inside the timed region.
- `asa-g8`, `asa-g4`: the ASA global layer at its defaults (l = 32, s = 16, l' = 64,
  n = 16) with 16 query heads of dims 192/128 and per-head keys (the un-absorbed layout),
  2 or 4 latent heads, i.e. G = 8 or 4 query heads per selection.

    python benchmarks/bench_nsa.py [--lengths 65536] [--configs fla asa-g8] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass

import torch
import triton
from common import fwd_and_fwd_bwd, sdpa_causal, timed
from nsa_kernels import compress_mean, nsa_attention


@dataclass(frozen=True)
class Setting:
    name: str
    heads: int
    kv_heads: int
    selection_heads: int
    qk_dim: int
    v_dim: int
    block_size: int
    stride: int
    select_block_size: int
    top_n: int


SETTINGS = {
    "fla": Setting("fla config (64 q / 4 kv, 128, l=s=l'=64)", 64, 4, 4, 128, 128, 64, 64, 64, 16),
    "asa-g8": Setting("ASA global, G=8 (16 heads, 192/128)", 16, 16, 2, 192, 128, 32, 16, 64, 16),
    "asa-g4": Setting("ASA global, G=4 (16 heads, 192/128)", 16, 16, 4, 192, 128, 32, 16, 64, 16),
}


def fla_layer(q, k, v, g_cmp, g_slc, setting: Setting):
    from fla.ops.nsa import parallel_nsa

    return lambda: parallel_nsa(
        q, k, v, g_cmp, g_slc, block_counts=setting.top_n, block_size=setting.select_block_size
    )


def our_layer(q, k, v, g_cmp, g_slc, setting: Setting):
    def forward() -> torch.Tensor:
        k_cmp = compress_mean(k, setting.block_size, setting.stride)
        v_cmp = compress_mean(v, setting.block_size, setting.stride)
        return nsa_attention(
            q, k, v, k_cmp, v_cmp, g_cmp, g_slc, block_size=setting.block_size,
            stride=setting.stride, select_block_size=setting.select_block_size,
            top_n=setting.top_n, num_selection_heads=setting.selection_heads, backend="triton",
        )

    return forward


def bench_one(setting: Setting, seqlen: int, with_fla: bool) -> dict[str, float]:
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = (1, seqlen)
    q = torch.randn(*shape, setting.heads, setting.qk_dim, device=device, dtype=dtype)
    k = torch.randn(*shape, setting.kv_heads, setting.qk_dim, device=device, dtype=dtype)
    v = torch.randn(*shape, setting.kv_heads, setting.v_dim, device=device, dtype=dtype)
    g_cmp, g_slc = torch.rand(2, *shape, setting.heads, device=device, dtype=dtype)
    inputs = [x.requires_grad_() for x in (q, k, v, g_cmp, g_slc)]
    row: dict[str, float] = {}
    runs = {"ours": our_layer(*inputs, setting)}
    if with_fla:
        runs["fla"] = fla_layer(*inputs, setting)
    for name, forward in runs.items():
        fwd, fwd_bwd = fwd_and_fwd_bwd(forward, inputs)
        row[f"{name} fwd"], row[f"{name} fwd+bwd"] = timed(fwd), timed(fwd_bwd)
    sdpa_forward, sdpa_inputs, _ = sdpa_causal(q, k, v)
    fwd, fwd_bwd = fwd_and_fwd_bwd(sdpa_forward, sdpa_inputs)
    row["SDPA fwd"], row["SDPA fwd+bwd"] = timed(fwd), timed(fwd_bwd)
    for p in ("fwd", "fwd+bwd"):
        row[f"SDPA/ours {p}"] = row[f"SDPA {p}"] / row[f"ours {p}"]
        if with_fla:
            row[f"fla/ours {p}"] = row[f"fla {p}"] / row[f"ours {p}"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description="Time the global layer's attention (bf16).")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", help="also write the results as a markdown table to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_nsa.py needs a CUDA GPU")

    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, Python {platform.python_version()}",
        "",
        "B=1, bf16, do_bench medians in ms; ratios > 1 mean ours is faster.",
        "",
    ]
    print("\n".join(lines), flush=True)
    for key in args.configs:
        setting = SETTINGS[key]
        with_fla = key == "fla"
        columns = ["ours fwd", "ours fwd+bwd", "SDPA fwd", "SDPA fwd+bwd",
                   "SDPA/ours fwd", "SDPA/ours fwd+bwd"]
        if with_fla:
            columns += ["fla fwd", "fla fwd+bwd", "fla/ours fwd", "fla/ours fwd+bwd"]
        table = [f"### {setting.name}", "", "| T | " + " | ".join(columns) + " |",
                 "|---|" + "---|" * len(columns)]
        print("\n".join(table), flush=True)
        for seqlen in args.lengths:
            try:
                row = bench_one(setting, seqlen, with_fla)
            except torch.OutOfMemoryError:
                line = f"| {seqlen} | out of memory |"
            else:
                line = f"| {seqlen} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |"
            table.append(line)
            print(line, flush=True)
            torch.cuda.empty_cache()
        lines += table + [""]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
