"""Tile helpers shared by the Triton kernels: how a head dim is covered by tiles (whole dims
in two power-of-two parts, so 96 = 64 + 32 is not padded to 128), the dot precision per dtype,
row loads and dot products over those parts, and chunked dot products for head dims too wide
to keep whole in registers (latent-absorbed 576/512)."""

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
    # An accumulator tile as two power-of-two widths (the second may be 0): a whole dim's
    # `split_key_dim`, a chunked dim's (tile, 0). Kernels that hold a whole key dim in its two
    # parts reduce over those instead of over the padded `block`.
    parts: tuple[int, int]


def split_key_dim(dim: int) -> tuple[int, int]:
    """Two power-of-two widths covering dim, each >= 16 (tl.dot); the second may be 0:
    96 = 64 + 32 and MLA's 192 = 128 + 64 instead of a padded 128 / 256."""
    if dim <= 16:
        return 16, 0
    first = 1 << (dim.bit_length() - 1)
    rest = dim - first
    return first, 0 if rest == 0 else max(16, triton.next_power_of_2(rest))


def head_split(dim: int, head_tile: int, head_chunk: int) -> HeadSplit:
    """Whole when the padded dim fits in `head_tile`, else chunks of `head_chunk` (reduction)
    and tiles of `head_tile` (accumulators)."""
    padded = max(16, triton.next_power_of_2(dim))
    if padded <= head_tile:
        return HeadSplit(padded, 1, padded, 1, split_key_dim(dim))
    return HeadSplit(
        head_chunk, triton.cdiv(dim, head_chunk), head_tile, triton.cdiv(dim, head_tile),
        (head_tile, 0),
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


@triton.jit
def load_parts(base, rows, rows_ok, col0, D: tl.constexpr, stride_d, W1: tl.constexpr,
               W2: tl.constexpr):
    """Columns [col0, col0 + W1) and [col0 + W1, col0 + W1 + W2) of `rows` as two tiles; the
    second is the first again when W2 == 0 (never read then)."""
    first = load_rows(base, rows, rows_ok, col0 + tl.arange(0, W1), D, stride_d)
    second = first
    if W2 > 0:
        second = load_rows(base, rows, rows_ok, col0 + W1 + tl.arange(0, W2), D, stride_d)
    return first, second


@triton.jit
def dot_parts(a1, a2, b1, b2, W2: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b^T over a head dim held in two parts (`load_parts`): [A, B] fp32."""
    acc = tl.dot(a1, tl.trans(b1), input_precision=PRECISION)
    if W2 > 0:
        acc += tl.dot(a2, tl.trans(b2), input_precision=PRECISION)
    return acc


@triton.jit
def store_parts(base, rows, rows_ok, col0, D: tl.constexpr, stride_d, x1, x2,
                W1: tl.constexpr, W2: tl.constexpr):
    """Store the two parts `load_parts` reads, cast to the destination's dtype."""
    cols = col0 + tl.arange(0, W1)
    tl.store(base + rows[:, None] + cols[None, :] * stride_d, x1.to(base.dtype.element_ty),
             mask=rows_ok[:, None] & (cols < D)[None, :])
    if W2 > 0:
        cols = col0 + W1 + tl.arange(0, W2)
        tl.store(base + rows[:, None] + cols[None, :] * stride_d, x2.to(base.dtype.element_ty),
                 mask=rows_ok[:, None] & (cols < D)[None, :])
