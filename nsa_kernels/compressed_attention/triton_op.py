"""Triton kernels for attention over compressed tokens (NSA's compression branch).

Flash-attention style. A forward program owns a tile of queries of one head and loops only
over the compressed blocks its last query can see (block i is visible to query t when
i*s + l - 1 <= t), with an online softmax in base 2. The backward recomputes the
probabilities from the saved log-sum-exp: one kernel accumulates dQ per query tile; another
accumulates dK/dV per tile of compressed keys, looping over the query tiles that see it and
over the query heads of its KV group, so no atomics are needed. The query range of a key tile
may be split over several programs whose fp32 partial sums are added afterwards: with few KV
heads and T/s compressed tokens there are otherwise too few key tiles to fill a GPU.

Only the steps on the causal edge need the visibility mask: every loop runs the steps whose
blocks all of its queries see (and that lie inside the sequence) without masks (at 64k, 96/64
on an H200, unmasked dK/dV steps alone took the backward from 7.24 to 6.27 ms). The work per
tile grows or shrinks linearly along the sequence, so each pass launches its programs on one
grid axis, the longest tiles first.

Head dims up to `TileConfig.head_tile` (after rounding up to a power of two) are held whole in
registers, a key dim in two power-of-two parts (`tiles.split_key_dim`: 96 = 64 + 32, not a
padded 128). Wider ones (latent-absorbed 576/512) are reduced in chunks of `head_chunk`, and the
accumulators along them (o, dq, dk, dv) are split over the grid, each program recomputing the
scores. All addressing is int64: T x heads x dim passes 2^31 at long T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..tiles import (
    HeadSplit,
    dot_parts,
    dot_precision,
    dot_rows,
    head_split,
    load_parts,
    load_rows,
    store_parts,
)
from ..utils import compressed_cu_seqlens, num_compressed_blocks, softmax_scale

LOG2E_VALUE = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); host side
LOG2E: tl.constexpr = tl.constexpr(LOG2E_VALUE)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Host-side layout


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the compressed-attention kernels; `default_tiles` picks them per device."""

    block_t: int = 64  # queries per forward / dQ program
    block_n: int = 64  # compressed tokens per forward / dQ step
    dkv_block_n: int = 32  # compressed tokens per dK/dV program
    dkv_block_t: int = 64  # queries per dK/dV step
    head_tile: int = 256  # widest (power-of-two) head dim kept whole; wider dims are split
    head_chunk: int = 64  # reduction chunk of head dims wider than head_tile
    num_warps: int = 4  # forward
    bwd_warps: int = 8  # backward: dK and dV accumulators share one program
    num_stages: int = 2
    dkv_splits: int | None = None  # query-range splits of the dK/dV pass; None: fill the GPU
    dkv_whole_steps: bool = True  # dK/dV: whole query tiles that see the key tile, unmasked

    def split(self, dim: int) -> HeadSplit:
        return head_split(dim, self.head_tile, self.head_chunk)


def default_tiles(device: torch.device, dtype: torch.dtype, dk: int, dv: int) -> TileConfig:
    """Tiles sized to fit sm_90's registers without spills for each head-dim class; small
    ones in the CPU interpreter, where work per op is costly. fp32 dots run on CUDA cores at
    full precision: smaller tiles keep them close to registers."""
    if device.type != "cuda":
        return TileConfig(block_t=32, block_n=32, num_stages=1, dkv_splits=1)
    if dtype == torch.float32:
        return TileConfig(
            block_t=32, block_n=32, dkv_block_n=32, dkv_block_t=32, bwd_warps=4, num_stages=1
        )
    if max(dk, dv) > 256:  # latent-absorbed dims, e.g. 576/512
        return TileConfig(block_t=32, block_n=32, dkv_block_n=32, dkv_block_t=32, num_warps=8)
    if max(dk, dv) > 128:  # e.g. per-head 192/128; dK/dV steps of 128 queries (swept on H100)
        return TileConfig(block_t=64, block_n=64, dkv_block_t=128, num_warps=8, num_stages=3)
    # Swept on H100 (benchmarks/tune_tiles.py --dims 96 64 / 128 128): 64 compressed tokens
    # per dK/dV program halve the query reads against 32, and 4 warps beat 8.
    if max(dk, dv) > 96:
        return TileConfig(dkv_block_n=64, dkv_block_t=32, bwd_warps=4)
    return TileConfig(dkv_block_n=64, dkv_block_t=64, bwd_warps=4, num_stages=3)


@dataclass(frozen=True)
class SeqLayout:
    """Where the sequences live: B equal-length rows, or documents packed into one row.

    With packing, `cu_seqlens` / `cu_cmp` hold each document's token / compressed-token
    offsets (int32 on the device) and the kernels index tiles through host-built tables.
    Without, the queries may start at position `q_offset` of the compressed keys' sequence.
    """

    cu_seqlens: torch.Tensor | None  # int32 [D + 1]
    cu_cmp: torch.Tensor | None  # int32 [D + 1]
    lengths: tuple[int, ...]  # tokens per document (one entry, T, without packing)
    cmp_lengths: tuple[int, ...]  # compressed tokens per document
    q_offset: int = 0  # position of the first query (unpacked only)

    @staticmethod
    def build(
        seqlen: int,
        block_size: int,
        stride: int,
        cu_seqlens: torch.Tensor | None,
        q_offset: int = 0,
    ) -> SeqLayout:
        if cu_seqlens is None:
            num_cmp = num_compressed_blocks(q_offset + seqlen, block_size, stride)
            return SeqLayout(None, None, (seqlen,), (num_cmp,), q_offset)
        cu_cmp = compressed_cu_seqlens(cu_seqlens, block_size, stride)
        bounds, cmp_bounds = cu_seqlens.tolist(), cu_cmp.tolist()
        return SeqLayout(
            cu_seqlens.to(torch.int32),
            cu_cmp.to(torch.int32),
            tuple(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)),
            tuple(b - a for a, b in zip(cmp_bounds[:-1], cmp_bounds[1:], strict=True)),
        )

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def tiles(
        self, block: int, device: torch.device, compressed: bool = False
    ) -> tuple[torch.Tensor | None, int]:
        """(table, tiles per row): the table's rows are (document, tile within the document),
        the tiles with the most work first (query tiles: the last ones of long documents;
        compressed-key tiles: the first ones, seen by the most queries), so the kernels launch
        them first and the short ones fill in behind. Without packing there is no table: the
        kernels take the tiles of every row in that order themselves."""
        lengths = self.cmp_lengths if compressed else self.lengths
        if not self.packed:
            return None, triton.cdiv(lengths[0], block)
        rows = [(d, i) for d, n in enumerate(lengths) for i in range(triton.cdiv(n, block))]
        if compressed:
            rows.sort(key=lambda row: lengths[row[0]] - row[1] * block, reverse=True)
        else:
            rows.sort(key=lambda row: min((row[1] + 1) * block, lengths[row[0]]), reverse=True)
        table = torch.tensor(rows, dtype=torch.int32).view(-1, 2).to(device)
        return table, len(rows)


# ----------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _doc_bounds(tiles, cu_seqlens, cu_cmp, pid):
    """(tile, first token, tokens, first compressed token, compressed tokens) of a packed tile."""
    doc = tl.load(tiles + 2 * pid)
    tile = tl.load(tiles + 2 * pid + 1)
    bos = tl.load(cu_seqlens + doc)
    cbos = tl.load(cu_cmp + doc)
    return tile, bos, tl.load(cu_seqlens + doc + 1) - bos, cbos, tl.load(cu_cmp + doc + 1) - cbos


@triton.jit
def _ranked_query_tile(rank, tiles, cu_seqlens, cu_cmp, num_tiles, seq_len, num_cmp,
                       PACKED: tl.constexpr):
    """`_doc_bounds` of the query tile of this rank: the tile with the most visible blocks
    first (packed tables are sorted so; unpacked, the last tile of the row)."""
    if PACKED:
        return _doc_bounds(tiles, cu_seqlens, cu_cmp, rank)
    return num_tiles - 1 - rank, 0, seq_len, 0, num_cmp


@triton.jit
def _num_visible(t, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Compressed blocks visible to query t (i*s + l - 1 <= t)."""
    return tl.where(t >= CMP_BLOCK - 1, (t - CMP_BLOCK + 1) // CMP_STRIDE + 1, 0)


@triton.jit
def _ranked_program(num_bh, PER_BH: tl.constexpr):
    """(tile rank, batch x head, index among the head's PER_BH programs) of this program.
    One grid axis, rank slowest: programs launch in that order, and each pass ranks its tiles
    by work (rank 0 the longest), so the long programs start first instead of ending it."""
    per_rank = num_bh * PER_BH
    rest = tl.program_id(0) % per_rank
    return tl.program_id(0) // per_rank, rest // PER_BH, rest % PER_BH


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _fwd_step(
    m_i, l_i, acc, start, q1, q2, q_base, q_rows, t, t_ok, k_base, v_base, cbos, n_vis,
    q_offset, cols_v, scale_log2, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    NUM_DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, WITH_OUTPUT: tl.constexpr,
    PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """One step of BLOCK_N compressed blocks of the online softmax. Without MASKED every
    query of the tile sees every block of the step: no visibility or bounds masks."""
    i = start + tl.arange(0, BLOCK_N)
    if MASKED:
        i_ok = i < n_vis
    else:
        i_ok = tl.full([BLOCK_N], True, tl.int1)
    k_rows = (cbos + i).to(tl.int64) * stride_kn
    if NUM_DK == 1:
        k1, k2 = load_parts(k_base, k_rows, i_ok, 0, DK, stride_kd, DK1, DK2)
        s = dot_parts(q1, q2, k1, k2, DK2, PRECISION)  # [BT, BN]
    else:
        s = dot_rows(
            q_base, q_rows, t_ok, stride_qd, k_base, k_rows, i_ok, stride_kd,
            DK, BLOCK_DK, NUM_DK, BLOCK_T, BLOCK_N, PRECISION,
        )
    s = s * scale_log2  # [BT, BN], base-2 units
    if MASKED:
        visible = (i[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= q_offset + t[:, None])
        s = tl.where(visible & i_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if WITH_OUTPUT:
        v_rows = (cbos + i).to(tl.int64) * stride_vn
        v_tile = load_rows(v_base, v_rows, i_ok, cols_v, DV, stride_vd)  # [BN, TILE_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    q, k, v, o, lse, tiles, cu_seqlens, cu_cmp,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lt, stride_lh,
    seq_len, num_cmp, q_offset, scale_log2, num_tiles, num_bh,
    HQ: tl.constexpr, GROUP: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    TILE_DV: tl.constexpr, NUM_TILES: tl.constexpr, PACKED: tl.constexpr,
    WITH_OUTPUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query tile of one head (x one DV tile): o and lse, or lse alone. A whole DK is
    held in its two parts DK1 + DK2 (`split_key_dim`)."""
    rank, pid_bh, pid_dv = _ranked_program(num_bh, NUM_TILES)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    tile, bos, length, cbos, n_cmp = _ranked_query_tile(
        rank, tiles, cu_seqlens, cu_cmp, num_tiles, seq_len, num_cmp, PACKED
    )

    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # positions inside the sequence
    t_ok = t < length
    q_base = q + b * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k + b * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    v_base = v + b * stride_vb + (h // GROUP).to(tl.int64) * stride_vh
    q_rows = (bos + t).to(tl.int64) * stride_qt
    last = q_offset + tl.minimum((tile + 1) * BLOCK_T, length) - 1  # the tile's last position
    n_vis = tl.minimum(_num_visible(last, CMP_BLOCK, CMP_STRIDE), n_cmp)

    cols_v = pid_dv * TILE_DV + tl.arange(0, TILE_DV)
    q1, q2 = t, t  # placeholders: chunked dims read Q in the steps
    if NUM_DK == 1:
        q1, q2 = load_parts(q_base, q_rows, t_ok, 0, DK, stride_qd, DK1, DK2)  # [BT, DK1|DK2]
    # Steps of blocks that the tile's first query already sees need no mask.
    n_first = tl.minimum(_num_visible(q_offset + tile * BLOCK_T, CMP_BLOCK, CMP_STRIDE), n_cmp)
    whole_end = n_first // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, TILE_DV], dtype=tl.float32)
    for start in range(0, whole_end, BLOCK_N):
        m_i, l_i, acc = _fwd_step(
            m_i, l_i, acc, start, q1, q2, q_base, q_rows, t, t_ok, k_base, v_base, cbos, n_vis,
            q_offset, cols_v, scale_log2, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
            CMP_BLOCK, CMP_STRIDE, DK, DV, BLOCK_T, BLOCK_N, BLOCK_DK, NUM_DK, DK1, DK2,
            WITH_OUTPUT, PRECISION, False,
        )
    for start in range(whole_end, n_vis, BLOCK_N):
        m_i, l_i, acc = _fwd_step(
            m_i, l_i, acc, start, q1, q2, q_base, q_rows, t, t_ok, k_base, v_base, cbos, n_vis,
            q_offset, cols_v, scale_log2, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
            CMP_BLOCK, CMP_STRIDE, DK, DV, BLOCK_T, BLOCK_N, BLOCK_DK, NUM_DK, DK1, DK2,
            WITH_OUTPUT, PRECISION, True,
        )

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse_t = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    lse_ptr = lse + b * stride_lb + (bos + t).to(tl.int64) * stride_lt + h.to(tl.int64) * stride_lh
    if pid_dv == 0:
        tl.store(lse_ptr, lse_t, mask=t_ok)
    if WITH_OUTPUT:
        o_base = o + b * stride_ob + h.to(tl.int64) * stride_oh
        o_rows = (bos + t).to(tl.int64) * stride_ot
        o_ptr = o_base + o_rows[:, None] + cols_v[None, :] * stride_od
        out = acc / l_safe[:, None]
        tl.store(o_ptr, out.to(o.dtype.element_ty), mask=t_ok[:, None] & (cols_v < DV)[None, :])


@triton.jit
def _delta_kernel(
    o, do, dlse, delta, num_rows,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE over contiguous [rows, DV] o and dO (fp32)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    rows = r.to(tl.int64) * DV
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, DV, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        o_t = load_rows(o, rows, r_ok, cols, DV, 1).to(tl.float32)
        do_t = load_rows(do, rows, r_ok, cols, DV, 1).to(tl.float32)
        acc += tl.sum(o_t * do_t, axis=1)
    if HAS_DLSE:
        acc -= tl.load(dlse + r, mask=r_ok, other=0.0)
    tl.store(delta + r, acc, mask=r_ok)


@triton.jit
def _dq_step(
    acc1, acc2, start, q1, q2, do_tile, q_base, q_rows, do_base, o_rows, t, t_ok,
    k_base, v_base, cbos, n_vis, q_offset, col0, lse_t, delta_t, scale_log2,
    stride_qd, stride_od, stride_kn, stride_kd, stride_vn, stride_vd,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    NUM_DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, BLOCK_DV: tl.constexpr,
    NUM_DV: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """Add one step of BLOCK_N compressed blocks to a query tile's dQ (x one DK tile).
    Without MASKED every query of the tile sees every block of the step: no masks."""
    i = start + tl.arange(0, BLOCK_N)
    if MASKED:
        i_ok = i < n_vis
    else:
        i_ok = tl.full([BLOCK_N], True, tl.int1)
    k_rows = (cbos + i).to(tl.int64) * stride_kn
    v_rows = (cbos + i).to(tl.int64) * stride_vn
    k1, k2 = load_parts(k_base, k_rows, i_ok, col0, DK, stride_kd, DK1, DK2)  # [BN, DK1|DK2]
    if NUM_DK == 1:
        s = dot_parts(q1, q2, k1, k2, DK2, PRECISION)  # [BT, BN]
    else:
        s = dot_rows(
            q_base, q_rows, t_ok, stride_qd, k_base, k_rows, i_ok, stride_kd,
            DK, BLOCK_DK, NUM_DK, BLOCK_T, BLOCK_N, PRECISION,
        )
    if NUM_DV == 1:
        v_tile = load_rows(v_base, v_rows, i_ok, tl.arange(0, BLOCK_DV), DV, stride_vd)
        dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=PRECISION)  # [BT, BN]
    else:
        dp = dot_rows(
            do_base, o_rows, t_ok, stride_od, v_base, v_rows, i_ok, stride_vd,
            DV, BLOCK_DV, NUM_DV, BLOCK_T, BLOCK_N, PRECISION,
        )
    p = tl.exp2(s * scale_log2 - lse_t[:, None])  # [BT, BN]
    if MASKED:
        visible = (i[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= q_offset + t[:, None])
        p = tl.where(visible & i_ok[None, :], p, 0.0)
    ds = (p * (dp - delta_t[:, None])).to(k1.dtype)
    acc1 += tl.dot(ds, k1, input_precision=PRECISION)
    if DK2 > 0:
        acc2 += tl.dot(ds, k2, input_precision=PRECISION)
    return acc1, acc2


@triton.jit
def _dq_kernel(
    q, k, v, do, lse, delta, dq, tiles, cu_seqlens, cu_cmp,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lt, stride_lh,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    seq_len, num_cmp, q_offset, scale, scale_log2, num_tiles, num_bh,
    HQ: tl.constexpr, GROUP: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr, NUM_TILES: tl.constexpr,
    PACKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one query tile of one head (x one DK tile, in parts DK1 + DK2); the `o` strides
    are dO's."""
    rank, pid_bh, pid_dk = _ranked_program(num_bh, NUM_TILES)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    tile, bos, length, cbos, n_cmp = _ranked_query_tile(
        rank, tiles, cu_seqlens, cu_cmp, num_tiles, seq_len, num_cmp, PACKED
    )

    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < length
    q_base = q + b * stride_qb + h.to(tl.int64) * stride_qh
    do_base = do + b * stride_ob + h.to(tl.int64) * stride_oh
    k_base = k + b * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    v_base = v + b * stride_vb + (h // GROUP).to(tl.int64) * stride_vh
    q_rows = (bos + t).to(tl.int64) * stride_qt
    o_rows = (bos + t).to(tl.int64) * stride_ot
    l_off = b * stride_lb + (bos + t).to(tl.int64) * stride_lt + h.to(tl.int64) * stride_lh
    lse_t = tl.load(lse + l_off, mask=t_ok, other=0.0)
    lse_t = tl.where(lse_t == float("-inf"), 0.0, lse_t * LOG2E)  # such rows see no block
    delta_t = tl.load(delta + l_off, mask=t_ok, other=0.0)
    last = q_offset + tl.minimum((tile + 1) * BLOCK_T, length) - 1  # the tile's last position
    n_vis = tl.minimum(_num_visible(last, CMP_BLOCK, CMP_STRIDE), n_cmp)

    offs_dv = tl.arange(0, BLOCK_DV)
    col0 = pid_dk * DK1  # the accumulator tile's first column
    q1, q2, do_tile = t, t, t  # placeholders: chunked dims read Q and dO in the steps
    if NUM_DK == 1:
        q1, q2 = load_parts(q_base, q_rows, t_ok, 0, DK, stride_qd, DK1, DK2)  # [BT, DK1|DK2]
    if NUM_DV == 1:
        do_tile = load_rows(do_base, o_rows, t_ok, offs_dv, DV, stride_od)  # [BT, DV]
    # Steps of blocks that the tile's first query already sees need no mask.
    n_first = tl.minimum(_num_visible(q_offset + tile * BLOCK_T, CMP_BLOCK, CMP_STRIDE), n_cmp)
    whole_end = n_first // BLOCK_N * BLOCK_N

    acc1 = tl.zeros([BLOCK_T, DK1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_T, DK2 if DK2 > 0 else 16], dtype=tl.float32)
    for start in range(0, whole_end, BLOCK_N):
        acc1, acc2 = _dq_step(
            acc1, acc2, start, q1, q2, do_tile, q_base, q_rows, do_base, o_rows, t, t_ok,
            k_base, v_base, cbos, n_vis, q_offset, col0, lse_t, delta_t, scale_log2,
            stride_qd, stride_od, stride_kn, stride_kd, stride_vn, stride_vd,
            CMP_BLOCK, CMP_STRIDE, DK, DV, BLOCK_T, BLOCK_N, BLOCK_DK, NUM_DK, DK1, DK2,
            BLOCK_DV, NUM_DV, PRECISION, False,
        )
    for start in range(whole_end, n_vis, BLOCK_N):
        acc1, acc2 = _dq_step(
            acc1, acc2, start, q1, q2, do_tile, q_base, q_rows, do_base, o_rows, t, t_ok,
            k_base, v_base, cbos, n_vis, q_offset, col0, lse_t, delta_t, scale_log2,
            stride_qd, stride_od, stride_kn, stride_kd, stride_vn, stride_vd,
            CMP_BLOCK, CMP_STRIDE, DK, DV, BLOCK_T, BLOCK_N, BLOCK_DK, NUM_DK, DK1, DK2,
            BLOCK_DV, NUM_DV, PRECISION, True,
        )

    dq_base = dq + b * stride_dqb + h.to(tl.int64) * stride_dqh
    dq_rows = (bos + t).to(tl.int64) * stride_dqt
    store_parts(dq_base, dq_rows, t_ok, col0, DK, stride_dqd, acc1 * scale, acc2 * scale,
                DK1, DK2)


@triton.jit
def _dkv_step(
    dk1, dk2, dv_acc, q_tile_idx, q, do, lse, delta, k1, k2, v_tile, k_base, k_rows,
    v_base, v_rows, i, i_ok, b, hk, bos, length, q_offset, col0, cols_v, scale_log2,
    stride_qb, stride_qt, stride_qh, stride_qd, stride_kd, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od, stride_lb, stride_lt, stride_lh,
    GROUP: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Add one query tile's terms (every head of the KV group) to a key tile's dK/dV. Without
    MASKED the tile is whole and sees every block: no visibility or bounds masks (rows past
    the last block accumulate terms that are never stored)."""
    t = q_tile_idx * BLOCK_T + tl.arange(0, BLOCK_T)
    if MASKED:
        t_ok = t < length
        visible = i[:, None] * CMP_STRIDE + CMP_BLOCK - 1 <= q_offset + t[None, :]
        visible = visible & t_ok[None, :] & i_ok[:, None]  # [BN, BT]
    else:
        t_ok = tl.full([BLOCK_T], True, tl.int1)
    q_rows = (bos + t).to(tl.int64) * stride_qt
    o_rows = (bos + t).to(tl.int64) * stride_ot
    offs_dv = tl.arange(0, BLOCK_DV)
    for g in range(GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q_base = q + b * stride_qb + h * stride_qh
        do_base = do + b * stride_ob + h * stride_oh
        l_off = b * stride_lb + (bos + t).to(tl.int64) * stride_lt + h * stride_lh
        if MASKED:
            lse_t = tl.load(lse + l_off, mask=t_ok, other=0.0)
            delta_t = tl.load(delta + l_off, mask=t_ok, other=0.0)
        else:
            lse_t = tl.load(lse + l_off)
            delta_t = tl.load(delta + l_off)
        lse_t = tl.where(lse_t == float("-inf"), 0.0, lse_t * LOG2E)
        q1, q2 = load_parts(q_base, q_rows, t_ok, col0, DK, stride_qd, DK1, DK2)
        if NUM_DK == 1:
            s = dot_parts(k1, k2, q1, q2, DK2, PRECISION)  # [BN, BT]
        else:
            s = dot_rows(
                k_base, k_rows, i_ok, stride_kd, q_base, q_rows, t_ok, stride_qd,
                DK, BLOCK_DK, NUM_DK, BLOCK_N, BLOCK_T, PRECISION,
            )
        if NUM_DV == 1:
            do_t = load_rows(do_base, o_rows, t_ok, offs_dv, DV, stride_od)  # [BT, DV]
            dp = tl.dot(v_tile, tl.trans(do_t), input_precision=PRECISION)
        else:
            dp = dot_rows(
                v_base, v_rows, i_ok, stride_vd, do_base, o_rows, t_ok, stride_od,
                DV, BLOCK_DV, NUM_DV, BLOCK_N, BLOCK_T, PRECISION,
            )
            do_t = load_rows(do_base, o_rows, t_ok, cols_v, DV, stride_od)  # [BT, TILE_DV]
        p = tl.exp2(s * scale_log2 - lse_t[None, :])  # [BN, BT]
        if MASKED:
            p = tl.where(visible, p, 0.0)
        dv_acc += tl.dot(p.to(do_t.dtype), do_t, input_precision=PRECISION)
        ds = (p * (dp - delta_t[None, :])).to(q1.dtype)
        dk1 += tl.dot(ds, q1, input_precision=PRECISION)
        if DK2 > 0:
            dk2 += tl.dot(ds, q2, input_precision=PRECISION)
    return dk1, dk2, dv_acc


@triton.jit
def _dkv_kernel(
    q, k, v, do, lse, delta, dk, dv, tiles, cu_seqlens, cu_cmp,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lt, stride_lh,
    stride_dks, stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvs, stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    seq_len, num_cmp, q_offset, scale, scale_log2, num_bh,
    HK: tl.constexpr, GROUP: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr, TILE_DV: tl.constexpr,
    NUM_TILES: tl.constexpr, SPLITS: tl.constexpr, WHOLE_STEPS: tl.constexpr,
    PACKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK/dV of one compressed-key tile of one KV head, over one part of its query range.

    Programs go tile by tile, the first tiles (seen by the most queries) first; within a tile
    they enumerate (batch x KV head, split, accumulator tile). Results go to dk[split],
    dv[split]. The dK tile is held in its two parts DK1 + DK2.
    """
    rank, pid_bh, inner = _ranked_program(num_bh, SPLITS * NUM_TILES)
    split = inner // NUM_TILES
    acc_tile = inner % NUM_TILES
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    if PACKED:
        tile, bos, length, cbos, n_cmp = _doc_bounds(tiles, cu_seqlens, cu_cmp, rank)
    else:
        tile, bos, length, cbos, n_cmp = rank, 0, seq_len, 0, num_cmp

    i = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # compressed blocks inside the sequence
    i_ok = i < n_cmp
    k_base = k + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v + b * stride_vb + hk.to(tl.int64) * stride_vh
    k_rows = (cbos + i).to(tl.int64) * stride_kn
    v_rows = (cbos + i).to(tl.int64) * stride_vn
    offs_dv = tl.arange(0, BLOCK_DV)
    col0 = acc_tile * DK1  # the dK tile's first column
    cols_v = acc_tile * TILE_DV + tl.arange(0, TILE_DV)
    k1, k2, v_tile = i, i, i  # placeholders: chunked dims read K and V in the steps
    if NUM_DK == 1:
        k1, k2 = load_parts(k_base, k_rows, i_ok, 0, DK, stride_kd, DK1, DK2)  # [BN, DK1|DK2]
    if NUM_DV == 1:
        v_tile = load_rows(v_base, v_rows, i_ok, offs_dv, DV, stride_vd)  # [BN, DV]

    # Query tiles that see the first block of this tile, split evenly over SPLITS programs.
    first = tl.maximum(tile * BLOCK_N * CMP_STRIDE + CMP_BLOCK - 1 - q_offset, 0) // BLOCK_T
    last = tl.cdiv(length, BLOCK_T)
    per_split = tl.cdiv(tl.maximum(last - first, 0), SPLITS)
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, last)

    # Query tiles that see every block of this tile and lie inside the sequence need no mask;
    # the ones before them (the causal edge) and a last partial tile do.
    i_last = tl.minimum((tile + 1) * BLOCK_N, n_cmp) - 1
    whole_lo = tl.cdiv(tl.maximum(i_last * CMP_STRIDE + CMP_BLOCK - 1 - q_offset, 0), BLOCK_T)
    whole_lo = tl.minimum(tl.maximum(whole_lo, lo), hi)
    whole_hi = tl.minimum(tl.maximum(length // BLOCK_T, whole_lo), hi)
    if not WHOLE_STEPS:
        whole_lo, whole_hi = hi, hi

    dk1 = tl.zeros([BLOCK_N, DK1], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, DK2 if DK2 > 0 else 16], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, TILE_DV], dtype=tl.float32)
    if WHOLE_STEPS:
        for q_tile_idx in range(whole_lo, whole_hi):
            dk1, dk2, dv_acc = _dkv_step(
                dk1, dk2, dv_acc, q_tile_idx, q, do, lse, delta, k1, k2, v_tile, k_base, k_rows,
                v_base, v_rows, i, i_ok, b, hk, bos, length, q_offset, col0, cols_v, scale_log2,
                stride_qb, stride_qt, stride_qh, stride_qd, stride_kd, stride_vd,
                stride_ob, stride_ot, stride_oh, stride_od, stride_lb, stride_lt, stride_lh,
                GROUP, CMP_BLOCK, CMP_STRIDE, DK, DV, BLOCK_T, BLOCK_N, BLOCK_DK, NUM_DK, DK1, DK2,
                BLOCK_DV, NUM_DV, PRECISION, False,
            )
    for j in range(lo, whole_lo + hi - whole_hi):  # the edge tiles, then the partial one
        q_tile_idx = tl.where(j < whole_lo, j, j - whole_lo + whole_hi)
        dk1, dk2, dv_acc = _dkv_step(
            dk1, dk2, dv_acc, q_tile_idx, q, do, lse, delta, k1, k2, v_tile, k_base, k_rows,
            v_base, v_rows, i, i_ok, b, hk, bos, length, q_offset, col0, cols_v, scale_log2,
            stride_qb, stride_qt, stride_qh, stride_qd, stride_kd, stride_vd,
            stride_ob, stride_ot, stride_oh, stride_od, stride_lb, stride_lt, stride_lh,
            GROUP, CMP_BLOCK, CMP_STRIDE, DK, DV, BLOCK_T, BLOCK_N, BLOCK_DK, NUM_DK, DK1, DK2,
            BLOCK_DV, NUM_DV, PRECISION, True,
        )

    n_rows = (cbos + i).to(tl.int64)
    dk_base = (
        dk + split.to(tl.int64) * stride_dks + b * stride_dkb + hk.to(tl.int64) * stride_dkh
    )
    store_parts(dk_base, n_rows * stride_dkn, i_ok, col0, DK, stride_dkd, dk1 * scale,
                dk2 * scale, DK1, DK2)
    dv_ptr = (
        dv + split.to(tl.int64) * stride_dvs + b * stride_dvb + hk.to(tl.int64) * stride_dvh
        + n_rows[:, None] * stride_dvn + cols_v[None, :] * stride_dvd
    )
    tl.store(dv_ptr, dv_acc.to(dv.dtype.element_ty), mask=i_ok[:, None] & (cols_v < DV)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers


def attention_forward(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor | None,
    block_size: int,
    stride: int,
    scale: float,
    layout: SeqLayout,
    cfg: TileConfig,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(o [B, T, HQ, DV] or None when v_cmp is None, lse [B, T, HQ] fp32)."""
    batch, seqlen, heads, dk = q.shape
    kv_heads = k_cmp.shape[2]
    with_output = v_cmp is not None
    dv = v_cmp.shape[-1] if with_output else dk
    lse = torch.empty(batch, seqlen, heads, dtype=torch.float32, device=q.device)
    o = q.new_empty(batch, seqlen, heads, dv) if with_output else None
    tiles, n_tiles = layout.tiles(cfg.block_t, q.device)
    if n_tiles == 0:
        return o, lse
    ksplit, vsplit = cfg.split(dk), cfg.split(dv)
    values = v_cmp if with_output else k_cmp  # never read without output
    out = o if with_output else q
    acc_tiles = vsplit.tiles if with_output else 1
    _fwd_kernel[(n_tiles * batch * heads * acc_tiles,)](
        q, k_cmp, values, out, lse, tiles, layout.cu_seqlens, layout.cu_cmp,
        *q.stride(), *k_cmp.stride(), *values.stride(), *out.stride(), *lse.stride(),
        seqlen, k_cmp.shape[1], layout.q_offset, scale * LOG2E_VALUE, n_tiles, batch * heads,
        HQ=heads, GROUP=heads // kv_heads, CMP_BLOCK=block_size, CMP_STRIDE=stride,
        DK=dk, DV=dv, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
        BLOCK_DK=ksplit.block, NUM_DK=ksplit.chunks, DK1=ksplit.parts[0], DK2=ksplit.parts[1],
        TILE_DV=vsplit.tile, NUM_TILES=acc_tiles, PACKED=layout.packed,
        WITH_OUTPUT=with_output,
        PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


DKV_PROGRAMS_PER_SM = 4
"""Programs the dK/dV pass aims for per SM, splitting the key tiles' query ranges when there
are fewer (short sequences, few KV heads). It holds two programs per SM (registers), and the
tiles with the longest ranges launch first, so a few waves balance: at 64k on an H200 (16
heads with their own keys, 1024 tile programs) one split beat 3 at 96/64 (6.44 vs 6.49 ms for
the backward) and 2 at 192/128 (20.10 vs 20.31 ms)."""


def _dkv_split_count(cfg: TileConfig, programs: int, max_splits: int, device: torch.device) -> int:
    """Query-range splits for the dK/dV pass: at least about `DKV_PROGRAMS_PER_SM` programs
    per SM."""
    if cfg.dkv_splits is not None:
        return max(1, min(cfg.dkv_splits, max_splits))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(DKV_PROGRAMS_PER_SM * sms, max(programs, 1))
    return max(1, min(max_splits, wanted, 64))


def attention_backward(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float,
    layout: SeqLayout,
    cfg: TileConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk_cmp, dv_cmp) from dO and the gradient of the log-sum-exp."""
    batch, seqlen, heads, dk = q.shape
    num_cmp, kv_heads, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    do = do.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    ksplit, vsplit = cfg.split(dk), cfg.split(dv)
    precision = dot_precision(q.dtype)

    delta = torch.empty_like(lse)  # [B, T, HQ] fp32, contiguous like lse
    rows = batch * seqlen * heads
    block_r = 16
    _delta_kernel[(triton.cdiv(rows, block_r),)](
        o, do, None if dlse is None else dlse.contiguous(), delta, rows,
        DV=dv, BLOCK_R=block_r, BLOCK_D=min(vsplit.tile, 128), HAS_DLSE=dlse is not None,
    )

    common = dict(
        CMP_BLOCK=block_size, CMP_STRIDE=stride, DK=dk, DV=dv,
        BLOCK_DK=ksplit.block, NUM_DK=ksplit.chunks, DK1=ksplit.parts[0], DK2=ksplit.parts[1],
        BLOCK_DV=vsplit.block, NUM_DV=vsplit.chunks, PACKED=layout.packed, PRECISION=precision,
        num_warps=cfg.bwd_warps, num_stages=cfg.num_stages,
    )
    q_tiles, n_q_tiles = layout.tiles(cfg.block_t, q.device)
    if n_q_tiles:
        _dq_kernel[(n_q_tiles * batch * heads * ksplit.tiles,)](
            q, k_cmp, v_cmp, do, lse, delta, dq, q_tiles, layout.cu_seqlens, layout.cu_cmp,
            *q.stride(), *k_cmp.stride(), *v_cmp.stride(), *do.stride(), *lse.stride(),
            *dq.stride(), seqlen, num_cmp, layout.q_offset, scale, scale * LOG2E_VALUE,
            n_q_tiles, batch * heads,
            HQ=heads, GROUP=heads // kv_heads, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n,
            NUM_TILES=ksplit.tiles, **common,
        )

    k_tiles, n_k_tiles = layout.tiles(cfg.dkv_block_n, q.device, compressed=True)
    if n_k_tiles == 0:
        return dq, torch.zeros_like(k_cmp), torch.zeros_like(v_cmp)
    acc_tiles = max(ksplit.tiles, vsplit.tiles)
    max_q_tiles = max(triton.cdiv(n, cfg.dkv_block_t) for n in layout.lengths)
    splits = _dkv_split_count(cfg, n_k_tiles * batch * kv_heads * acc_tiles, max_q_tiles, q.device)
    part_dtype = torch.float32 if splits > 1 else k_cmp.dtype
    dk_parts = torch.empty(splits, batch, num_cmp, kv_heads, dk, dtype=part_dtype, device=q.device)
    dv_parts = torch.empty(splits, batch, num_cmp, kv_heads, dv, dtype=part_dtype, device=q.device)
    _dkv_kernel[(n_k_tiles * batch * kv_heads * splits * acc_tiles,)](
        q, k_cmp, v_cmp, do, lse, delta, dk_parts, dv_parts,
        k_tiles, layout.cu_seqlens, layout.cu_cmp,
        *q.stride(), *k_cmp.stride(), *v_cmp.stride(), *do.stride(), *lse.stride(),
        *dk_parts.stride(), *dv_parts.stride(),
        seqlen, num_cmp, layout.q_offset, scale, scale * LOG2E_VALUE, batch * kv_heads,
        HK=kv_heads, GROUP=heads // kv_heads, BLOCK_T=cfg.dkv_block_t, BLOCK_N=cfg.dkv_block_n,
        TILE_DV=vsplit.tile, NUM_TILES=acc_tiles, SPLITS=splits,
        WHOLE_STEPS=cfg.dkv_whole_steps, **common,
    )
    if splits == 1:
        return dq, dk_parts[0], dv_parts[0]
    return dq, dk_parts.sum(0).to(k_cmp.dtype), dv_parts.sum(0).to(v_cmp.dtype)


class CompressedAttentionFunction(torch.autograd.Function):
    """Autograd wrapper; both outputs are differentiable (dLSE flows into dS = P * dLSE)."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, block_size, stride, scale, layout, cfg):
        ctx.set_materialize_grads(False)
        o, lse = attention_forward(q, k_cmp, v_cmp, block_size, stride, scale, layout, cfg)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.args = (block_size, stride, scale, layout, cfg)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        if do is None and dlse is None:
            return (None,) * 8
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = attention_backward(do, dlse, q, k_cmp, v_cmp, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.compressed_attention`, on the Triton kernels.

    q [B, T, HQ, DK], k_cmp [B, N, HK, DK], v_cmp [B, N, HK, DV] ->
    (o [B, T, HQ, DV], lse [B, T, HQ] fp32; o = 0 and lse = -inf where no block is visible).
    `tiles` overrides the tile sizes (see `default_tiles`).
    """
    scale = softmax_scale(scale, q.shape[-1])
    cfg = tiles or default_tiles(q.device, q.dtype, q.shape[-1], v_cmp.shape[-1])
    layout = SeqLayout.build(q.shape[1], block_size, stride, cu_seqlens, q_offset)
    return CompressedAttentionFunction.apply(
        q, k_cmp, v_cmp, block_size, stride, scale, layout, cfg
    )


def compressed_lse(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """The log-sum-exp [B, T, HQ] of compressed attention alone (no values, no autograd)."""
    scale = softmax_scale(scale, q.shape[-1])
    cfg = tiles or default_tiles(q.device, q.dtype, q.shape[-1], q.shape[-1])
    layout = SeqLayout.build(q.shape[1], block_size, stride, cu_seqlens, q_offset)
    return attention_forward(q, k_cmp, None, block_size, stride, scale, layout, cfg)[1]
