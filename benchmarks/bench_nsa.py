"""Speed of the whole global layer's attention (compression + top-n + selection, gated)
against full causal attention through torch SDPA and, on its own configuration, against
flash-linear-attention's `parallel_nsa`: one GPU, B = 1, bf16, forward and forward+backward.

Settings:
- `fla`: fla's config, 64 query heads, 4 KV heads, dim 128, mean pooling with
  l = s = l' = 64, n = 16, no window; both sides pool K and V inside the timed region.
- `asa-g8`, `asa-g4`: the ASA global layer at its defaults (l = 32, s = 16, l' = 64,
  n = 16) with 16 query heads of dims 192/128 and per-head keys (the un-absorbed layout),
  2 or 4 latent heads, i.e. G = 8 or 4 query heads per selection.
- `asa-g8-latent`, `asa-g4-latent`: the same layer in the latent-absorbed layout: one
  KV head per latent head holding [c ; k^R] (d_c' + d_R = 512 + 64) with V = c (512), the G
  query heads of a latent absorbed into it (W_UK folded into the query, W_UV applied to the
  output outside the kernels, as MLA does). SDPA runs the model's un-absorbed dims (192/128).
- `-q4` variants: 4 consecutive queries share one selection (the ASA paper's setting).

`--breakdown` also times each branch alone (compressed attention, top-n, selected
attention) so the share of each is visible.

    python benchmarks/bench_nsa.py [--lengths 65536] [--configs fla asa-g8] [--breakdown]
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass

import torch
import triton
from common import fwd_and_fwd_bwd, sdpa_causal, timed

from nsa_kernels import (
    compress_mean,
    compressed_attention,
    nsa_attention,
    select_blocks,
    selected_attention,
)


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
    query_block: int = 1
    sdpa_dims: tuple[int, int] | None = None  # the model's full-attention dims, if not ours


def asa(g: int, latent: bool, query_block: int = 1) -> Setting:
    latents = 16 // g
    layout = "latent-absorbed, 576/512" if latent else "per-head keys, 192/128"
    name = f"ASA global, G={g} (16 heads, {layout}, q={query_block})"
    if latent:
        return Setting(name, 16, latents, latents, 576, 512, 32, 16, 64, 16, query_block,
                       sdpa_dims=(192, 128))
    return Setting(name, 16, 16, latents, 192, 128, 32, 16, 64, 16, query_block)


SETTINGS = {
    "fla": Setting("fla config (64 q / 4 kv, 128, l=s=l'=64)", 64, 4, 4, 128, 128, 64, 64, 64, 16),
    "asa-g8": asa(8, latent=False),
    "asa-g4": asa(4, latent=False),
    "asa-g8-latent": asa(8, latent=True),
    "asa-g4-latent": asa(4, latent=True),
    "asa-g8-q4": asa(8, latent=False, query_block=4),
    "asa-g4-q4": asa(4, latent=False, query_block=4),
    "asa-g8-latent-q4": asa(8, latent=True, query_block=4),
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
            top_n=setting.top_n, num_selection_heads=setting.selection_heads,
            selection_query_block=setting.query_block, backend="triton",
        )

    return forward


def branches(q, k, v, setting: Setting) -> dict[str, float]:
    """fwd+bwd ms of compressed attention (with pooling) and selected attention, and the
    top-n selection's ms, each alone."""
    blocks = (setting.block_size, setting.stride)
    inputs = [q, k, v]

    def compressed() -> torch.Tensor:
        k_cmp, v_cmp = compress_mean(k, *blocks), compress_mean(v, *blocks)
        return compressed_attention(q, k_cmp, v_cmp, *blocks, backend="triton")[0]

    with torch.no_grad():
        k_cmp = compress_mean(k, *blocks)
        _, lse = compressed_attention(q, k_cmp, compress_mean(v, *blocks), *blocks)

    def select() -> torch.Tensor:
        return select_blocks(
            q, k_cmp, *blocks, setting.select_block_size, setting.top_n,
            num_selection_heads=setting.selection_heads,
            selection_query_block=setting.query_block, lse=lse, backend="triton",
        )

    indices = select()

    def selected() -> torch.Tensor:
        return selected_attention(
            q, k, v, indices, setting.select_block_size,
            selection_query_block=setting.query_block, backend="triton",
        )

    return {
        "cmp fwd+bwd": timed(fwd_and_fwd_bwd(compressed, inputs)[1]),
        "top-n": timed(select),
        "slc fwd+bwd": timed(fwd_and_fwd_bwd(selected, inputs)[1]),
    }


def bench_one(
    setting: Setting, seqlen: int, with_fla: bool, breakdown: bool
) -> dict[str, float]:
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
    if breakdown:
        row.update(branches(q, k, v, setting))
    if setting.sdpa_dims is not None:
        qk_dim, v_dim = setting.sdpa_dims
        q = torch.randn(*shape, setting.heads, qk_dim, device=device, dtype=dtype)
        k = torch.randn(*shape, setting.heads, qk_dim, device=device, dtype=dtype)
        v = torch.randn(*shape, setting.heads, v_dim, device=device, dtype=dtype)
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
    parser.add_argument("--breakdown", action="store_true", help="also time each branch alone")
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
        if args.breakdown:
            columns += ["cmp fwd+bwd", "top-n", "slc fwd+bwd"]
        table = [f"### {setting.name}", "", "| T | " + " | ".join(columns) + " |",
                 "|---|" + "---|" * len(columns)]
        print("\n".join(table), flush=True)
        for seqlen in args.lengths:
            try:
                row = bench_one(setting, seqlen, with_fla, args.breakdown)
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
