"""Tile helpers shared by the Triton kernels: how a head dim is covered by tiles, the dot
precision per dtype, and row loads and chunked dot products for head dims too wide to keep
whole in registers (latent-absorbed 576/512)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class HeadSplit:
    """How one head dim is covered: reduction chunks for dot products over it, and
    accumulator tiles for outputs along it."""

    block: int  # reduction chunk width (power of two)
    chunks: int  # reduction chunks
    tile: int  # accumulator tile width (power of two)
    tiles: int  # accumulator tiles


def head_split(dim: int, head_tile: int, head_chunk: int) -> HeadSplit:
    """Whole when the padded dim fits in `head_tile`, else chunks of `head_chunk` (reduction)
    and tiles of `head_tile` (accumulators)."""
    padded = max(16, triton.next_power_of_2(dim))
    if padded <= head_tile:
        return HeadSplit(padded, 1, padded, 1)
    return HeadSplit(
        head_chunk, triton.cdiv(dim, head_chunk), head_tile, triton.cdiv(dim, head_tile)
    )


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots: TF32 would break agreement with the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def load_rows(base, rows, rows_ok, cols, D: tl.constexpr, stride_d):
    """[len(rows), len(cols)] tile; `rows` are int64 offsets already times the row stride."""
    mask = rows_ok[:, None] & (cols < D)[None, :]
    return tl.load(base + rows[:, None] + cols[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def dot_rows(
    a_base, a_rows, a_ok, stride_a, b_base, b_rows, b_ok, stride_b,
    D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PRECISION: tl.constexpr,
):
    """a @ b^T over a head dim too wide for registers, read in NUM_D chunks: [A, B] fp32."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for c in tl.static_range(NUM_D):
        cols = c * BLOCK_D + tl.arange(0, BLOCK_D)
        a = load_rows(a_base, a_rows, a_ok, cols, D, stride_a)
        b = load_rows(b_base, b_rows, b_ok, cols, D, stride_b)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc
