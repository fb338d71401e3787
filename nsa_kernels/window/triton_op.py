"""Sliding-window causal attention in Triton: forward and flash-attention-2 style backward.

Query t attends keys j with max(t - w + 1, doc_start(t)) <= j <= t. Each query tile visits
only the KV tiles of its window (and each KV tile only the query tiles that see it), so the
cost is O(T * w). Tiles whose every (query, key) pair is visible skip the mask.

Head dims need not be powers of two: the key dim is split into two power-of-two parts
(MLA's 192 = 128 + 64, the absorbed 576 = 512 + 64, so no padding there), the value dim is
padded to the next power of two with masked loads.

Backward: a preprocess computes delta = rowsum(dO * O); one kernel owns a KV tile and loops
over the query heads of its group and the query tiles that see it (dK, dV without atomics);
a second kernel owns a query tile and recomputes the probabilities for dQ.

Token positions are int32 (T < 2**31); every product with a stride is int64, either a tile's
row offset or a batch/head offset, while offsets inside a tile stay int32 (cheap registers).
Packed documents come in as each token's document start and end ([T] int32 each).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..tiles import split_key_dim
from ..utils import softmax_scale
from . import reference

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 1024  # larger K or V head dims do not fit the tiles below in shared memory
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are defined


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch settings of one kernel: `rows` per program, `step` per loop turn."""

    rows: int
    step: int
    warps: int
    stages: int


@dataclass(frozen=True)
class Blocks:
    """Tiles of the forward, dQ and dK/dV kernels."""

    fwd: Tiles  # query tile, KV step
    dq: Tiles  # query tile, KV step
    dkv: Tiles  # KV tile, query step


def block_config(dk: int, dv: int, element_size: int = 2) -> Blocks:
    """Tiles by head dim (bytes per row), sized for H100 registers and shared memory.

    The CPU interpreter gets small tiles so that short test sequences still cross tiles.
    """
    if INTERPRETED:
        return Blocks(Tiles(32, 16, 1, 1), Tiles(32, 16, 1, 1), Tiles(32, 16, 1, 1))
    width = max(dk, dv) * element_size // 2
    if width <= 128:
        return Blocks(Tiles(128, 64, 8, 3), Tiles(128, 32, 8, 2), Tiles(128, 32, 8, 2))
    if width <= 256:
        return Blocks(Tiles(128, 64, 8, 2), Tiles(128, 32, 8, 2), Tiles(64, 32, 8, 2))
    return Blocks(Tiles(32, 32, 8, 1), Tiles(32, 16, 8, 1), Tiles(16, 16, 8, 1))


def head_tiles(dk: int, dv: int) -> dict[str, int]:
    """Constexpr widths of the key-dim parts (BK1, BK2) and the padded value dim (BDV)."""
    bk1, bk2 = split_key_dim(dk)
    return dict(DK=dk, DV=dv, BK1=bk1, BK2=bk2, BDV=max(16, triton.next_power_of_2(dv)))


# --- tile helpers -------------------------------------------------------------------------


@triton.jit
def _tile_ptrs(ptr, start, stride, ROWS: tl.constexpr, COL0: tl.constexpr, WIDTH: tl.constexpr):
    """Pointers to rows [start, start + ROWS), columns [COL0, COL0 + WIDTH) of a row-major
    slab: the tile's row offset is taken in int64, in-tile offsets stay int32."""
    rows = tl.arange(0, ROWS)
    cols = COL0 + tl.arange(0, WIDTH)
    return ptr + tl.cast(start, tl.int64) * stride + (rows[:, None] * stride + cols[None, :])


@triton.jit
def _load_tile(ptr, start, stride, T, ROWS: tl.constexpr, COL0: tl.constexpr,
               WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    """A [ROWS, WIDTH] tile of a [T, NCOLS] slab, zeros outside it."""
    ptrs = _tile_ptrs(ptr, start, stride, ROWS, COL0, WIDTH)
    row_ok = (start + tl.arange(0, ROWS))[:, None] < T
    if COL0 + WIDTH > NCOLS:
        cols = COL0 + tl.arange(0, WIDTH)
        return tl.load(ptrs, mask=row_ok & (cols[None, :] < NCOLS), other=0.0)
    return tl.load(ptrs, mask=row_ok, other=0.0)


@triton.jit
def _store_tile(ptr, x, start, stride, T, ROWS: tl.constexpr, COL0: tl.constexpr,
                WIDTH: tl.constexpr, NCOLS: tl.constexpr):
    """Store `x` into the tile `_load_tile` reads, in the slab's dtype, rows < T only."""
    ptrs = _tile_ptrs(ptr, start, stride, ROWS, COL0, WIDTH)
    row_ok = (start + tl.arange(0, ROWS))[:, None] < T
    x = x.to(ptr.dtype.element_ty)
    if COL0 + WIDTH > NCOLS:
        cols = COL0 + tl.arange(0, WIDTH)
        tl.store(ptrs, x, mask=row_ok & (cols[None, :] < NCOLS))
    else:
        tl.store(ptrs, x, mask=row_ok)


@triton.jit
def _row_lo(rows, T, window, DOC_START, IS_VARLEN: tl.constexpr):
    """First visible key of each query row: max(t - w + 1, start of t's document, 0)."""
    lo = tl.maximum(rows - window + 1, 0)
    if IS_VARLEN:
        lo = tl.maximum(lo, tl.load(DOC_START + rows, mask=rows < T, other=0))
    return lo


@triton.jit
def _key_blocks(m0, T, window, DOC_START, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_VARLEN: tl.constexpr):
    """KV blocks (in units of BLOCK_N) seen by the query tile [m0, m0 + BLOCK_M).

    Returns (lo, full_lo, full_hi, hi): blocks in [full_lo, full_hi) are visible to every
    row of the tile and need no mask; [lo, full_lo) and [full_hi, hi) are masked.
    """
    last = tl.minimum(m0 + BLOCK_M, T) - 1
    first_key = tl.maximum(m0 - window + 1, 0)
    full_key = tl.maximum(m0 + BLOCK_M - window, 0)  # window edge of the tile's last row
    if IS_VARLEN:
        first_key = tl.maximum(first_key, tl.load(DOC_START + m0))
        full_key = tl.maximum(full_key, tl.load(DOC_START + last))
    lo = first_key // BLOCK_N
    hi = tl.cdiv(last + 1, BLOCK_N)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(full_key, BLOCK_N), lo), hi)
    full_hi = tl.minimum(tl.maximum((m0 + 1) // BLOCK_N, full_lo), hi)  # block ends <= m0
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_blocks(n0, T, window, DOC_END, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    """Query tiles (in units of BLOCK_M) that see the keys [n0, n0 + BLOCK_N).

    Queries t in [n0, last key + w - 1] of the same document; returns (lo, full_lo,
    full_hi, hi) as `_key_blocks` does.
    """
    last = tl.minimum(n0 + BLOCK_N, T) - 1
    query_end = tl.minimum(last + window, T)
    full_end = tl.minimum(n0 + window, T)  # a full tile ends within the first key's window
    if IS_VARLEN:
        query_end = tl.minimum(query_end, tl.load(DOC_END + last))
        doc_end = tl.load(DOC_END + n0)
        full_end = tl.where(doc_end > last, tl.minimum(full_end, doc_end), 0)
    lo = n0 // BLOCK_M
    hi = tl.cdiv(query_end, BLOCK_M)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M), lo), hi)
    full_hi = tl.minimum(tl.maximum(full_end // BLOCK_M, full_lo), hi)
    return lo, full_lo, full_hi, hi


# --- forward ------------------------------------------------------------------------------


@triton.jit
def _fwd_block(acc, m_i, l_i, q1, q2, K, V, rows_m, row_lo, n0, stride_kt, stride_vt, T,
               qk_scale, BLOCK_N: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
               BDV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, MASK: tl.constexpr):
    k1 = _load_tile(K, n0, stride_kt, T, BLOCK_N, 0, BK1, DK)  # [BN, BK1]
    s = tl.dot(q1, tl.trans(k1))  # [BM, BN]
    if BK2 > 0:
        k2 = _load_tile(K, n0, stride_kt, T, BLOCK_N, BK1, BK2, DK)
        s += tl.dot(q2, tl.trans(k2))
    s *= qk_scale  # log2 units
    if MASK:
        rows_n = n0 + tl.arange(0, BLOCK_N)
        visible = (rows_n[None, :] <= rows_m[:, None]) & (rows_n[None, :] >= row_lo[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite, so no inf - inf
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    v = _load_tile(V, n0, stride_vt, T, BLOCK_N, 0, BDV, DV)  # [BN, BDV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, DOC_START,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, HQ, GROUP, window, qk_scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BK1: tl.constexpr, BK2: tl.constexpr, BDV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, query head); online softmax over the window."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // HQ, bh % HQ
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh

    rows_m = m0 + tl.arange(0, BLOCK_M)
    row_lo = _row_lo(rows_m, T, window, DOC_START, IS_VARLEN)
    q1 = _load_tile(Q, m0, stride_qt, T, BLOCK_M, 0, BK1, DK)  # [BM, BK1]
    q2 = q1
    if BK2 > 0:
        q2 = _load_tile(Q, m0, stride_qt, T, BLOCK_M, BK1, BK2, DK)  # [BM, BK2]

    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_blocks(m0, T, window, DOC_START, BLOCK_M, BLOCK_N, IS_VARLEN)
    for nb in range(lo, full_lo):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q1, q2, K, V, rows_m, row_lo, nb * BLOCK_N,
                                   stride_kt, stride_vt, T, qk_scale, BLOCK_N, BK1, BK2, BDV,
                                   DK, DV, True)
    for nb in range(full_lo, full_hi):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q1, q2, K, V, rows_m, row_lo, nb * BLOCK_N,
                                   stride_kt, stride_vt, T, qk_scale, BLOCK_N, BK1, BK2, BDV,
                                   DK, DV, False)
    for nb in range(full_hi, hi):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q1, q2, K, V, rows_m, row_lo, nb * BLOCK_N,
                                   stride_kt, stride_vt, T, qk_scale, BLOCK_N, BK1, BK2, BDV,
                                   DK, DV, True)

    # Every real row sees its own key, so l_i >= 1; the guard only covers padding rows.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    _store_tile(O + b * stride_ob + h * stride_oh, acc / l_i[:, None], m0, stride_ot, T,
                BLOCK_M, 0, BDV, DV)
    tl.store(LSE + bh * T + rows_m, m_i + tl.log2(l_i), mask=rows_m < T)


# --- backward -----------------------------------------------------------------------------


@triton.jit
def _delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_db, stride_dt, stride_dh,
    T, HQ,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, BDV: tl.constexpr,
):
    """delta[b, h, t] = sum_d dO * O, the softmax-gradient correction of each row."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // HQ, bh % HQ
    o = _load_tile(O + b * stride_ob + h * stride_oh, m0, stride_ot, T, BLOCK_M, 0, BDV, DV)
    do = _load_tile(DO + b * stride_db + h * stride_dh, m0, stride_dt, T, BLOCK_M, 0, BDV, DV)
    rows = m0 + tl.arange(0, BLOCK_M)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * T + rows, delta, mask=rows < T)


@triton.jit
def _dkv_block(dk1, dk2, dv, k1, k2, v, Q, DO, LSE, DELTA, DOC_START, rows_n, m0, stride_qt,
               stride_dot, T, window, qk_scale, BLOCK_M: tl.constexpr, BK1: tl.constexpr,
               BK2: tl.constexpr, BDV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               IS_VARLEN: tl.constexpr, MASK: tl.constexpr):
    rows_m = m0 + tl.arange(0, BLOCK_M)
    q1 = _load_tile(Q, m0, stride_qt, T, BLOCK_M, 0, BK1, DK)  # [BM, BK1]
    s_t = tl.dot(k1, tl.trans(q1))  # [BN, BM]
    if BK2 > 0:
        q2 = _load_tile(Q, m0, stride_qt, T, BLOCK_M, BK1, BK2, DK)
        s_t += tl.dot(k2, tl.trans(q2))
    lse = tl.load(LSE + rows_m, mask=rows_m < T, other=0.0)
    p_t = tl.exp2(s_t * qk_scale - lse[None, :])  # [BN, BM]
    if MASK:
        row_lo = _row_lo(rows_m, T, window, DOC_START, IS_VARLEN)
        visible = (rows_n[:, None] <= rows_m[None, :]) & (rows_n[:, None] >= row_lo[None, :])
        p_t = tl.where(visible & (rows_m[None, :] < T), p_t, 0.0)
    do = _load_tile(DO, m0, stride_dot, T, BLOCK_M, 0, BDV, DV)  # [BM, BDV]
    dv += tl.dot(p_t.to(do.dtype), do)
    dp_t = tl.dot(v, tl.trans(do))  # [BN, BM]
    delta = tl.load(DELTA + rows_m, mask=rows_m < T, other=0.0)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q1.dtype)
    dk1 += tl.dot(ds_t, q1)
    if BK2 > 0:
        dk2 += tl.dot(ds_t, q2)
    return dk1, dk2, dv


@triton.jit
def _dkv_tiles(dk1, dk2, dv, k1, k2, v, Q, DO, LSE, DELTA, DOC_START, rows_n, b, hk, first, count,
               stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
               T, HQ, GROUP, window, qk_scale, BLOCK_M: tl.constexpr, BK1: tl.constexpr,
               BK2: tl.constexpr, BDV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               IS_VARLEN: tl.constexpr, MASK: tl.constexpr):
    """Accumulate query tiles [first, first + count) of every query head of KV head `hk`."""
    for i in range(GROUP * count):
        h = hk * GROUP + i // count
        dk1, dk2, dv = _dkv_block(dk1, dk2, dv, k1, k2, v, Q + b * stride_qb + h * stride_qh,
                                  DO + b * stride_dob + h * stride_doh, LSE + (b * HQ + h) * T,
                                  DELTA + (b * HQ + h) * T, DOC_START, rows_n,
                                  (first + i % count) * BLOCK_M, stride_qt, stride_dot, T,
                                  window, qk_scale, BLOCK_M, BK1, BK2, BDV, DK, DV, IS_VARLEN,
                                  MASK)
    return dk1, dk2, dv


@triton.jit
def _dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, DOC_START, DOC_END,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    T, HQ, HK, GROUP, window, scale, qk_scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BK1: tl.constexpr, BK2: tl.constexpr, BDV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One program: dK, dV of BLOCK_N keys of one (batch, KV head).

    It sums over the GROUP query heads sharing the KV head and over the query tiles whose
    window holds these keys, so every dK/dV row has a single writer and no atomics.
    """
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, hk = bh // HK, bh % HK
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    rows_n = n0 + tl.arange(0, BLOCK_N)
    k1 = _load_tile(K, n0, stride_kt, T, BLOCK_N, 0, BK1, DK)  # [BN, BK1]
    k2 = k1
    if BK2 > 0:
        k2 = _load_tile(K, n0, stride_kt, T, BLOCK_N, BK1, BK2, DK)  # [BN, BK2]
    v = _load_tile(V, n0, stride_vt, T, BLOCK_N, 0, BDV, DV)  # [BN, BDV]

    dk1 = tl.zeros([BLOCK_N, BK1], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BK2 if BK2 > 0 else 16], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BDV], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_blocks(n0, T, window, DOC_END, BLOCK_N, BLOCK_M, IS_VARLEN)
    # One flat loop over (query head, query tile) per range: a loop over heads around a loop
    # over tiles makes the compiler keep far more registers live (spills on H100).
    dk1, dk2, dv = _dkv_tiles(
        dk1, dk2, dv, k1, k2, v, Q, DO, LSE, DELTA, DOC_START, rows_n, b, hk, lo, full_lo - lo,
        stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
        T, HQ, GROUP, window, qk_scale, BLOCK_M, BK1, BK2, BDV, DK, DV, IS_VARLEN, True,
    )
    dk1, dk2, dv = _dkv_tiles(
        dk1, dk2, dv, k1, k2, v, Q, DO, LSE, DELTA, DOC_START, rows_n, b, hk, full_lo,
        full_hi - full_lo, stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
        T, HQ, GROUP, window, qk_scale, BLOCK_M, BK1, BK2, BDV, DK, DV, IS_VARLEN, False,
    )
    dk1, dk2, dv = _dkv_tiles(
        dk1, dk2, dv, k1, k2, v, Q, DO, LSE, DELTA, DOC_START, rows_n, b, hk, full_hi,
        hi - full_hi, stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
        T, HQ, GROUP, window, qk_scale, BLOCK_M, BK1, BK2, BDV, DK, DV, IS_VARLEN, True,
    )

    DK_OUT += b * stride_dkb + hk * stride_dkh
    _store_tile(DK_OUT, dk1 * scale, n0, stride_dkt, T, BLOCK_N, 0, BK1, DK)
    if BK2 > 0:
        _store_tile(DK_OUT, dk2 * scale, n0, stride_dkt, T, BLOCK_N, BK1, BK2, DK)
    _store_tile(DV_OUT + b * stride_dvb + hk * stride_dvh, dv, n0, stride_dvt, T, BLOCK_N, 0,
                BDV, DV)


@triton.jit
def _dq_block(dq1, dq2, q1, q2, do, lse, delta, K, V, rows_m, row_lo, n0, stride_kt, stride_vt,
              T, qk_scale, BLOCK_N: tl.constexpr, BK1: tl.constexpr, BK2: tl.constexpr,
              BDV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, MASK: tl.constexpr):
    k1 = _load_tile(K, n0, stride_kt, T, BLOCK_N, 0, BK1, DK)  # [BN, BK1]
    s = tl.dot(q1, tl.trans(k1))  # [BM, BN]
    if BK2 > 0:
        k2 = _load_tile(K, n0, stride_kt, T, BLOCK_N, BK1, BK2, DK)
        s += tl.dot(q2, tl.trans(k2))
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK:
        rows_n = n0 + tl.arange(0, BLOCK_N)
        visible = (rows_n[None, :] <= rows_m[:, None]) & (rows_n[None, :] >= row_lo[:, None])
        p = tl.where(visible, p, 0.0)
    v = _load_tile(V, n0, stride_vt, T, BLOCK_N, 0, BDV, DV)  # [BN, BDV]
    dp = tl.dot(do, tl.trans(v))  # [BM, BN]
    ds = (p * (dp - delta[:, None])).to(k1.dtype)
    dq1 += tl.dot(ds, k1)
    if BK2 > 0:
        dq2 += tl.dot(ds, k2)
    return dq1, dq2


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ_OUT, DOC_START,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    T, HQ, GROUP, window, scale, qk_scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BK1: tl.constexpr, BK2: tl.constexpr, BDV: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """One program: dQ of BLOCK_M queries of one (batch, query head); walks KV as the forward."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // HQ, bh % HQ
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh

    rows_m = m0 + tl.arange(0, BLOCK_M)
    row_lo = _row_lo(rows_m, T, window, DOC_START, IS_VARLEN)
    q1 = _load_tile(Q, m0, stride_qt, T, BLOCK_M, 0, BK1, DK)  # [BM, BK1]
    q2 = q1
    if BK2 > 0:
        q2 = _load_tile(Q, m0, stride_qt, T, BLOCK_M, BK1, BK2, DK)  # [BM, BK2]
    do = _load_tile(DO + b * stride_dob + h * stride_doh, m0, stride_dot, T, BLOCK_M, 0, BDV, DV)
    lse = tl.load(LSE + bh * T + rows_m, mask=rows_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + rows_m, mask=rows_m < T, other=0.0)

    dq1 = tl.zeros([BLOCK_M, BK1], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BK2 if BK2 > 0 else 16], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_blocks(m0, T, window, DOC_START, BLOCK_M, BLOCK_N, IS_VARLEN)
    for nb in range(lo, full_lo):
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, do, lse, delta, K, V, rows_m, row_lo,
                             nb * BLOCK_N, stride_kt, stride_vt, T, qk_scale, BLOCK_N, BK1, BK2,
                             BDV, DK, DV, True)
    for nb in range(full_lo, full_hi):
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, do, lse, delta, K, V, rows_m, row_lo,
                             nb * BLOCK_N, stride_kt, stride_vt, T, qk_scale, BLOCK_N, BK1, BK2,
                             BDV, DK, DV, False)
    for nb in range(full_hi, hi):
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, do, lse, delta, K, V, rows_m, row_lo,
                             nb * BLOCK_N, stride_kt, stride_vt, T, qk_scale, BLOCK_N, BK1, BK2,
                             BDV, DK, DV, True)

    DQ_OUT += b * stride_dqb + h * stride_dqh
    _store_tile(DQ_OUT, dq1 * scale, m0, stride_dqt, T, BLOCK_M, 0, BK1, DK)
    if BK2 > 0:
        _store_tile(DQ_OUT, dq2 * scale, m0, stride_dqt, T, BLOCK_M, BK1, BK2, DK)


# --- launch -------------------------------------------------------------------------------


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, T, H, D] tensor whose last dim is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last_dim(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _document_bounds(
    cu_seqlens: torch.Tensor | None, seqlen: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token start and end of its packed document ([T] int32), or 1-element dummies."""
    if cu_seqlens is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    start = torch.repeat_interleave(cu[:-1], lengths, output_size=seqlen)
    end = torch.repeat_interleave(cu[1:], lengths, output_size=seqlen)
    return start.to(torch.int32), end.to(torch.int32)


class SlidingWindowAttention(torch.autograd.Function):
    """Autograd wrapper: the forward saves the log-sum-exp so the backward recomputes P."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,  # [B, T, HQ, DK]
        k: torch.Tensor,  # [B, T, HK, DK]
        v: torch.Tensor,  # [B, T, HK, DV]
        window: int,
        scale: float,
        doc_start: torch.Tensor,  # [T] int32, or a dummy when not packed
        doc_end: torch.Tensor,
        is_varlen: bool,
    ) -> torch.Tensor:
        batch, seqlen, hq, dk = q.shape
        hk, dv = k.shape[2], v.shape[3]
        o = torch.empty(batch, seqlen, hq, dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, hq, seqlen, dtype=torch.float32, device=q.device)  # log2 units
        tiles = block_config(dk, dv, q.element_size()).fwd
        grid = (triton.cdiv(seqlen, tiles.rows), batch * hq)
        _fwd_kernel[grid](
            q, k, v, o, lse, doc_start,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            seqlen, hq, hq // hk, window, scale * LOG2E,
            BLOCK_M=tiles.rows, BLOCK_N=tiles.step, IS_VARLEN=is_varlen, **head_tiles(dk, dv),
            num_warps=tiles.warps, num_stages=tiles.stages,
        )
        ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
        ctx.window, ctx.scale, ctx.is_varlen = window, scale, is_varlen
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
        do = _unit_last_dim(do)  # [B, T, HQ, DV]
        batch, seqlen, hq, dk = q.shape
        hk, dv = k.shape[2], v.shape[3]
        group = hq // hk
        dims = head_tiles(dk, dv)
        blocks = block_config(dk, dv, q.element_size())
        scale, qk_scale = ctx.scale, ctx.scale * LOG2E

        delta = torch.empty_like(lse)  # [B, HQ, T]
        delta_m = max(16, 8192 // dims["BDV"])
        _delta_kernel[(triton.cdiv(seqlen, delta_m), batch * hq)](
            o, do, delta, *_strides(o), *_strides(do), seqlen, hq,
            DV=dv, BLOCK_M=delta_m, BDV=dims["BDV"],
        )
        dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(IS_VARLEN=ctx.is_varlen, **dims)
        _dkv_kernel[(triton.cdiv(seqlen, blocks.dkv.rows), batch * hk)](
            q, k, v, do, lse, delta, dk_, dv_, doc_start, doc_end,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk_),
            *_strides(dv_),
            seqlen, hq, hk, group, ctx.window, scale, qk_scale,
            BLOCK_N=blocks.dkv.rows, BLOCK_M=blocks.dkv.step, **common,
            num_warps=blocks.dkv.warps, num_stages=blocks.dkv.stages,
        )
        _dq_kernel[(triton.cdiv(seqlen, blocks.dq.rows), batch * hq)](
            q, k, v, do, lse, delta, dq, doc_start,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            seqlen, hq, group, ctx.window, scale, qk_scale,
            BLOCK_M=blocks.dq.rows, BLOCK_N=blocks.dq.step, **common,
            num_warps=blocks.dq.warps, num_stages=blocks.dq.stages,
        )
        return dq, dk_, dv_, None, None, None, None, None


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """q [B, T, HQ, DK], k [B, o + T, HK, DK], v [B, o + T, HK, DV] -> o [B, T, HQ, DV].

    Same semantics as `reference.sliding_window_attention`; inputs are assumed checked by
    the public op (shapes, grouped heads, cu_seqlens with B == 1, o = `q_offset`). With
    o > 0 the kernels run on the last min(o, w - 1) + T keys, with zero queries in front of
    the real ones whose outputs are dropped (their gradient is zero, so nothing leaks).
    """
    dk, dv = q.shape[-1], v.shape[-1]
    if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(
            f"sliding_window_attention (triton) supports head dims up to {MAX_HEAD_DIM}, got "
            f"DK={dk}, DV={dv}; use backend='reference'"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"sliding_window_attention (triton) does not support dtype {q.dtype}")
    scale = softmax_scale(scale, dk)
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:  # nothing to launch
        return reference.sliding_window_attention(
            q, k, v, window_size, scale, cu_seqlens, q_offset
        )
    halo = min(q_offset, window_size - 1)
    if halo:
        k, v = k[:, q_offset - halo :], v[:, q_offset - halo :]
        q = torch.cat((q.new_zeros(q.shape[0], halo, *q.shape[2:]), q), dim=1)
    seqlen = q.shape[1]
    window = min(window_size, seqlen)
    q, k, v = _unit_last_dim(q), _unit_last_dim(k), _unit_last_dim(v)
    doc_start, doc_end = _document_bounds(cu_seqlens, seqlen, q.device)
    out = SlidingWindowAttention.apply(
        q, k, v, window, scale, doc_start, doc_end, cu_seqlens is not None
    )
    return out[:, halo:]
