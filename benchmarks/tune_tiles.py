"""Sweep the tile configurations of the compressed- and selected-attention kernels on the
global layer's shapes and print forward and forward+backward times per configuration, next
to the default's; every candidate's outputs and gradients are checked against the default's
first, so a faster configuration that computes something else is reported, not chosen.

The ASA global layer at its defaults: 16 query heads with per-head keys of dims 192/128
(`--dims`: the 350m preset's are 96/64), l = 32, s = 16, l' = 64, n = 16, 4 queries per
selection; B = 1, bf16.

    python benchmarks/tune_tiles.py [--seq-length 65536] [--ops compressed selected] [--dims 96 64]
"""

from __future__ import annotations

import argparse
import itertools
import random
from dataclasses import replace

import torch
from common import fwd_and_fwd_bwd, timed

from nsa_kernels import compress_mean, select_blocks
from nsa_kernels.compressed_attention import triton_op as cmp_op
from nsa_kernels.selected_attention import triton_op as slc_op

HEADS, L, S, LP, N, QB, HI = 16, 32, 16, 64, 16, 4, 2


def candidates_compressed(default: cmp_op.TileConfig) -> list[cmp_op.TileConfig]:
    """The default, the default with the dK/dV query ranges split 1 to 8 ways
    (`dkv_splits`) and with its whole query tiles masked (`dkv_whole_steps`), then a sample
    of the grid: 64-query tiles for the forward and dQ (32 measured twice as slow), the rest
    varied; the backward is most of the time."""
    grid = itertools.product((64,), (32, 64), (32, 64, 128), (32, 64, 128), (4, 8), (2, 3))
    rest = [default]
    for block_t, block_n, dkv_n, dkv_t, warps, stages in grid:
        cfg = replace(default, block_t=block_t, block_n=block_n, dkv_block_n=dkv_n,
                      dkv_block_t=dkv_t, bwd_warps=warps, num_stages=stages)
        if cfg != default:
            rest.append(cfg)
    splits = [replace(default, dkv_splits=n) for n in (1, 2, 4, 8)]
    masked = replace(default, dkv_whole_steps=not default.dkv_whole_steps)
    return [default, *splits, masked, *shuffled(rest)[1:]]


def shuffled(configs: list) -> list:
    """The default first, then the rest in a fixed random order (a budget takes a sample)."""
    rest = configs[1:]
    random.Random(0).shuffle(rest)
    return [configs[0], *rest]


def candidates_selected(default: slc_op.TileConfig) -> list[slc_op.TileConfig]:
    """The default (forward and dQ from the key blocks at these shapes), the query-major
    passes with their default tile, the default with the query lists cut at other lengths
    (`dkv_chunk`), then a sample of both kinds: rows per key-major step or queries per query
    tile, dK/dV rows, warps and pipeline stages."""
    query_major = replace(default, key_major=False, block_q=4 * QB)
    rest = []
    for rows, dkv_rows, warps, bwd_warps, stages in itertools.product(
        (32, 64, 128), (32, 64), (4, 8), (4, 8), (1, 2)
    ):
        common = dict(dkv_rows=dkv_rows, num_warps=warps, bwd_warps=bwd_warps,
                      num_stages=stages)
        rest.append(replace(default, key_rows=rows, **common))
        rest.append(replace(query_major, block_q=rows // 8, **common))
    rest = [cfg for cfg in dict.fromkeys(rest) if cfg not in (default, query_major)]
    chunks = [replace(default, dkv_chunk=c) for c in (1024, 2048, 4096, 8192, 65536)]
    return [default, query_major, *chunks, *shuffled([default, *rest])[1:]]


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    pairs = zip(a, b, strict=True)
    return all((x.float() - y.float()).norm() <= 2e-2 * y.float().norm() + 1e-6 for x, y in pairs)


def sweep(name: str, run, configs: list, inputs: list[torch.Tensor], budget: int) -> None:
    """run(cfg) -> output; times each config (fwd, fwd+bwd), in order, up to `budget`."""
    do = None
    results, reference = [], None
    for cfg in configs[:budget]:
        try:
            forward = lambda cfg=cfg: run(cfg)  # noqa: E731
            out = forward()
            do = torch.randn_like(out) if do is None else do
            grads = torch.autograd.grad(out, inputs, do)
            check = [out.detach(), *grads]
            if reference is None:
                reference = check
            elif not close(check, reference):
                print(f"{name}: {cfg} differs from the default; skipped", flush=True)
                continue
            fwd, fwd_bwd = fwd_and_fwd_bwd(forward, inputs)
            results.append((timed(fwd_bwd), timed(fwd), cfg))
        except Exception as error:  # out of resources for this tile size: keep sweeping
            print(f"{name}: {cfg} failed: {type(error).__name__}", flush=True)
            continue
        print(f"{name}: fwd {results[-1][1]:.2f} ms, fwd+bwd {results[-1][0]:.2f} ms  {cfg}",
              flush=True)
    default_ms = results[0][0]
    print(f"\n{name}: best five of {len(results)} (default fwd+bwd {default_ms:.2f} ms)")
    for fwd_bwd, fwd, cfg in sorted(results, key=lambda r: r[0])[:5]:
        print(f"  fwd+bwd {fwd_bwd:.2f} ms ({default_ms / fwd_bwd:.2f}x), fwd {fwd:.2f}  {cfg}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=65536)
    parser.add_argument("--ops", nargs="+", choices=("compressed", "selected"),
                        default=["compressed", "selected"])
    parser.add_argument("--budget", type=int, default=24, help="configurations per op at most")
    parser.add_argument("--dims", type=int, nargs=2, default=[192, 128], metavar=("DK", "DV"))
    args = parser.parse_args()
    device, dtype, T = torch.device("cuda"), torch.bfloat16, args.seq_length
    DK, DV = args.dims
    torch.manual_seed(0)
    q = torch.randn(1, T, HEADS, DK, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, T, HEADS, DK, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, T, HEADS, DV, device=device, dtype=dtype, requires_grad=True)
    if "compressed" in args.ops:
        k_cmp = compress_mean(k.detach(), L, S).requires_grad_()
        v_cmp = compress_mean(v.detach(), L, S).requires_grad_()
        default = cmp_op.default_tiles(device, dtype, DK, DV)
        sweep(
            "compressed",
            lambda cfg: cmp_op.compressed_attention(q, k_cmp, v_cmp, L, S, tiles=cfg)[0],
            candidates_compressed(default), [q, k_cmp, v_cmp], args.budget,
        )
    if "selected" in args.ops:
        with torch.no_grad():
            k_cmp = compress_mean(k, L, S)
            indices = select_blocks(q, k_cmp, L, S, LP, N, num_selection_heads=HI,
                                    selection_query_block=QB)
        default = slc_op.default_tiles(device, dtype, DK, DV)
        sweep(
            "selected",
            lambda cfg: slc_op.selected_attention(q, k, v, indices, LP, tiles=cfg),
            candidates_selected(default), [q, k, v], args.budget,
        )


if __name__ == "__main__":
    main()
