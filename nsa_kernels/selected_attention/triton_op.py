"""Triton kernels for attention over selected blocks (NSA's selection branch).

Query t of head h attends, causally (key j <= t), to the tokens of the blocks that selection
head h // (HQ / HI) chose for it, reading KV head h // (HQ / HK) (with a query offset o, the T
queries are the last T of o + T keys and query row i sits at t = o + i). One of HK, HI must
divide the other; this covers GQA/NSA (HI == HK), un-absorbed GLA (HK == HQ) and latent-absorbed GLA
(HK == HI). A *unit* is the set of UNIT = HQ / max(HK, HI) consecutive query heads that share
both their keys and their selection: those heads are the rows of every tl.dot, so no group
size is too small (rows are padded to 16 by masking when needed).

dK/dV: an inverse index in CSR form (built with torch ops: for each batch row, owner head and
key block, the queries that chose the block, in ascending order) lets one program own one key
block of one KV head and loop over its queries in steps of rows, so dK and dV need no atomics
and every query that picked the block is counted, however many there are. Lists longer than
`dkv_chunk` (block 0 is chosen by every query) are split over several programs that write
fp32 partial sums; a second kernel adds them in a fixed order, so dK and dV are deterministic.

Forward and dQ, key-major (units of fewer than 16 heads, whole head dims): the same programs
over the same lists. The forward needs no running maximum: each row's scores are measured
against an upper bound (Cauchy-Schwarz: ||q|| times the largest key norm of its KV head), so
exp2(s - bound) never exceeds 1, and one launch adds each block's P V and the sum of P into
fp32 buffers with relaxed atomics, divided out after. Rows whose sum of exp2(s - bound) is
so small that its terms near fp32 underflow (BOUND_SLACK) are flagged on the device and
summed again against their exact maxima (an atomic max pass), by two launches that do nothing
when no row is flagged: nothing is read back to the host. dQ adds dS K the same way inside
the dK/dV program. A query gets one add per block it chose, so there is little contention, and
each chosen block is read once per list step instead of once per query.

Forward and dQ, query-major (units of 16+ heads, which fill a tile's rows with one query's
heads; head dims split over tiles; `key_major=False`, whose results are bitwise
deterministic): a program owns BLOCK_Q consecutive queries of one unit (BLOCK_Q x UNIT
rows) and walks the union of their selections, precomputed per query tile with torch ops
as the ascending distinct blocks plus a bitmask of the tile's queries that chose each one.
Every block is read once per tile and masked, row by row, to those queries; the forward
keeps an online softmax in base 2.

Both ways, indices that are -1, repeated in a row or after the query's own block are
dropped (repeats count once, as in the reference), keys are masked to j <= t, the forward
saves the base-2 log-sum-exp, and rows that see no key give o = 0 and lse = -inf, never NaN.

Head dims up to `TileConfig.head_tile` (after rounding up to a power of two) stay whole in
registers, a key dim in two power-of-two parts (`tiles.split_key_dim`: 96 = 64 + 32, not a
padded 128); wider ones (latent-absorbed 576/512) are reduced in chunks of `head_chunk` and the
accumulators along them are split over the grid, each program recomputing the scores. Every
token or row offset is widened to int64 before it is multiplied by a stride.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
from ..utils import softmax_scale

LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------------------------
# Host-side layout


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch settings; `default_tiles` picks them per device."""

    block_q: int | None = None  # queries per query-major program (<= 31); None: see Problem
    dkv_rows: int = 64  # (query, head) rows per step of the dK/dV loop
    dkv_chunk: int | None = None  # list entries per key-block program; None: balance the device
    head_tile: int = 256  # widest (power-of-two) head dim kept whole; wider dims are split
    head_chunk: int = 64  # reduction chunk of head dims wider than head_tile
    num_warps: int = 4
    bwd_warps: int = 4
    num_stages: int = 2
    # The forward and dQ from the key blocks' query lists, as dK/dV: both read each chosen
    # block once instead of once per query tile, and add into fp32 buffers with relaxed
    # atomics. False: query-major forward and dQ passes (bitwise deterministic); None: key-major
    # when a unit has fewer than 16 heads (rows a query tile pads or fills from several
    # selections). Key-major needs both head dims whole in one tile (`head_tile`).
    key_major: bool | None = None
    key_rows: int = 64  # (query, head) rows per step of the key-major forward loops

    def split(self, dim: int) -> HeadSplit:
        return head_split(dim, self.head_tile, self.head_chunk)


def default_tiles(device: torch.device, dtype: torch.dtype, dk: int, dv: int) -> TileConfig:
    """In the CPU interpreter every op costs about the same whatever its size: large query
    tiles (fewer programs). On a GPU, 32-row dK/dV steps for fp32 or wide heads (registers),
    64 otherwise; heads split into tiles (latent-absorbed 576/512) are not pipelined, as two
    stages of their tiles pass sm_90's shared memory."""
    if device.type != "cuda":
        return TileConfig(block_q=16, dkv_rows=32, key_rows=32, num_stages=1)
    if dtype == torch.float32:
        return TileConfig(dkv_rows=32, num_stages=1)
    if max(dk, dv) > TileConfig.head_tile:
        return TileConfig(dkv_rows=32, bwd_warps=8, num_stages=1)
    if max(dk, dv) > 128:
        return TileConfig(dkv_rows=32, bwd_warps=8)
    return TileConfig()


@dataclass(frozen=True)
class HeadLayout:
    """Query head h reads KV head h // (HQ / HK) and selection head h // (HQ / HI).

    Units (UNIT query heads sharing keys and selection) are numbered u = h // UNIT. The CSR
    inverse index is kept per *owner* head, the coarser of the two: the selection head when
    HI <= HK (its KV heads reuse one list) and the KV head when HI > HK (its list entries then
    also name the selection head inside it, `sel_per_owner` of them).
    """

    heads: int  # HQ
    kv_heads: int  # HK
    sel_heads: int  # HI

    @staticmethod
    def build(heads: int, kv_heads: int, sel_heads: int) -> HeadLayout:
        if kv_heads % sel_heads and sel_heads % kv_heads:
            raise ValueError(
                f"selected_attention (triton) needs the selection heads ({sel_heads}) and the "
                f"KV heads ({kv_heads}) to divide one another; use backend='reference'"
            )
        return HeadLayout(heads, kv_heads, sel_heads)

    @property
    def units(self) -> int:
        return max(self.kv_heads, self.sel_heads)

    @property
    def unit(self) -> int:
        return self.heads // self.units

    @property
    def owners(self) -> int:
        return min(self.kv_heads, self.sel_heads)

    @property
    def kv_per_owner(self) -> int:
        return self.kv_heads // self.owners

    @property
    def sel_per_owner(self) -> int:
        return self.sel_heads // self.owners


@dataclass(frozen=True)
class SeqLayout:
    """Where the sequences live: B equal rows of T tokens, or documents packed in one row."""

    seq_len: int  # query tokens T
    cu_seqlens: torch.Tensor | None  # int32 [D + 1] on the device
    lengths: tuple[int, ...]  # tokens per document (one entry, T, without packing)
    q_offset: int = 0  # unpacked only: queries are the last T of q_offset + T keys

    @staticmethod
    def build(
        seq_len: int, cu_seqlens: torch.Tensor | None, device: torch.device, q_offset: int = 0
    ) -> SeqLayout:
        if cu_seqlens is None:
            return SeqLayout(seq_len, None, (seq_len,), q_offset)
        bounds = cu_seqlens.tolist()
        lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        return SeqLayout(seq_len, cu_seqlens.to(device=device, dtype=torch.int32), lengths)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def tiles(self, size: int, device: torch.device) -> tuple[torch.Tensor | None, int]:
        """(table, count) of the tiles of `size` tokens of every sequence. With packing the
        int32 table [count, 2] holds (document, tile inside the document); without, tile i
        of every batch row is program i and there is no table."""
        if not self.packed:
            return None, triton.cdiv(self.seq_len, size)
        per_doc = torch.tensor([triton.cdiv(n, size) for n in self.lengths], device=device)
        count = int(sum(triton.cdiv(n, size) for n in self.lengths))
        doc = torch.repeat_interleave(
            torch.arange(len(self.lengths), device=device), per_doc, output_size=count
        )
        first = torch.cumsum(per_doc, 0) - per_doc  # first tile of each document
        tile = torch.arange(count, device=device) - first[doc]
        return torch.stack([doc, tile], 1).to(torch.int32), count

    def tile_tokens(self, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [count, size] (int64, in the batch row) of the tiles of `tiles(size)`, and
        which of them exist [count, size] (the last tile of a sequence may be short)."""
        table, count = self.tiles(size, device)
        offs = torch.arange(size, device=device)
        if table is None:
            tokens = torch.arange(count, device=device)[:, None] * size + offs
            return tokens, tokens < self.seq_len
        cu = self.cu_seqlens.long()
        doc, start = table[:, 0].long(), table[:, 1].long()[:, None] * size + offs
        return cu[doc][:, None] + start, start < (cu[doc + 1] - cu[doc])[:, None]

    def token_blocks(
        self, size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(position of each query inside its document [T], global id of its document's
        block 0 [T], key blocks in all), blocks being `size` tokens of one document."""
        tokens = torch.arange(self.seq_len, device=device)
        if not self.packed:
            keys = self.q_offset + self.seq_len
            return self.q_offset + tokens, torch.zeros_like(tokens), triton.cdiv(keys, size)
        lengths = torch.tensor(self.lengths, device=device)
        doc = torch.repeat_interleave(
            torch.arange(len(self.lengths), device=device), lengths, output_size=self.seq_len
        )
        per_doc = torch.div(lengths + size - 1, size, rounding_mode="floor")
        first_block = torch.cumsum(per_doc, 0) - per_doc
        starts = self.cu_seqlens.long()[:-1]
        total = sum(triton.cdiv(n, size) for n in self.lengths)
        return tokens - starts[doc], first_block[doc], total


# ----------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _tile_start(tiles, cu_seqlens, pid, SIZE: tl.constexpr):
    """(first token of packed tile `pid` inside its document, document start, its length)."""
    doc = tl.load(tiles + 2 * pid)
    start = tl.load(tiles + 2 * pid + 1) * SIZE
    bos = tl.load(cu_seqlens + doc)
    return start, bos, tl.load(cu_seqlens + doc + 1) - bos


@triton.jit
def _key_block(
    seg, kv_sub, tiles, cu_seqlens, seq_len, num_blocks, q_offset,
    OWNERS: tl.constexpr, KV_PER_OWNER: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr, PACKED: tl.constexpr,
):
    """What a key-block program owns: segment seg = (b * OWNERS + owner) * num_blocks +
    block, KV head kv_sub of the owner -> (b, KV head, document start, key positions [BK]
    inside the sequence, which of them exist)."""
    gid = seg % num_blocks
    b = seg // num_blocks // OWNERS
    hk = (seg // num_blocks % OWNERS) * KV_PER_OWNER + kv_sub
    if PACKED:
        start, bos, length = _tile_start(tiles, cu_seqlens, gid, BLOCK_SIZE)
    else:
        start, bos, length = gid * BLOCK_SIZE, 0, seq_len
    offs_k = tl.arange(0, BLOCK_K)
    key = start + offs_k
    return b, hk, bos, key, (offs_k < BLOCK_SIZE) & (key < length + q_offset)


@triton.jit
def _list_rows(
    queries, step, end, hk, ROWS_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    UNIT: tl.constexpr, UNIT_P: tl.constexpr, SEL_PER_OWNER: tl.constexpr,
    KV_GROUP: tl.constexpr,
):
    """Rows of one step over a key block's query list: ROWS_Q entries from `step` x UNIT
    heads -> (list entry, which rows exist, token in the batch row, query head), each [BR].
    An entry is token * SEL_PER_OWNER + the selection head inside the owner."""
    r = tl.arange(0, BLOCK_R)
    entry = step + r // UNIT_P
    row_ok = (r // UNIT_P < ROWS_Q) & (r % UNIT_P < UNIT) & (entry < end)
    code = tl.load(queries + entry, mask=row_ok, other=0).to(tl.int64)
    h = hk * KV_GROUP + (code % SEL_PER_OWNER) * UNIT + r % UNIT_P
    return entry, row_ok, code // SEL_PER_OWNER, h


@triton.jit
def _saved_lse(lse, row_off, row_ok):
    """The forward's base-2 log-sum-exp of rows; 0 for rows that saw no key (their P is 0
    through the -inf scores, never NaN)."""
    lse_row = tl.load(lse + row_off, mask=row_ok, other=0.0)
    return tl.where(lse_row == float("-inf"), 0.0, lse_row)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _fwd_kernel(
    q, k, v, o, lse, union, members, counts, tiles, cu_seqlens,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    seq_len, num_tiles, width, q_offset, scale_log2,
    HQ: tl.constexpr, HI: tl.constexpr, UNITS: tl.constexpr, UNIT: tl.constexpr,
    UNIT_P: tl.constexpr, KV_GROUP: tl.constexpr, SEL_GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    DK1: tl.constexpr, DK2: tl.constexpr, TILE_DV: tl.constexpr, PACKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """o and lse (base 2) of BLOCK_Q queries x one unit of heads (x one DV tile); a whole DK
    is held in its two parts DK1 + DK2."""
    pid_tile = tl.program_id(0)
    pid_dv = tl.program_id(2)
    b = (tl.program_id(1) // UNITS).to(tl.int64)
    u = tl.program_id(1) % UNITS
    if PACKED:
        first, bos, length = _tile_start(tiles, cu_seqlens, pid_tile, BLOCK_Q)
    else:
        first, bos, length = pid_tile * BLOCK_Q, 0, seq_len
    # Row r: query first + r // UNIT_P (inside its sequence) of head u * UNIT + r % UNIT_P.
    row_q = tl.arange(0, BLOCK_R) // UNIT_P
    t = first + row_q
    h = (u * UNIT + tl.arange(0, BLOCK_R) % UNIT_P).to(tl.int64)
    row_ok = (row_q < BLOCK_Q) & (tl.arange(0, BLOCK_R) % UNIT_P < UNIT) & (t < length)
    hk = (u * UNIT // KV_GROUP).to(tl.int64)
    tok = (bos + t).to(tl.int64)  # [BR] token of each row in its batch row
    sel_row = (b * num_tiles + pid_tile) * HI + u * UNIT // SEL_GROUP
    union_row = union + sel_row * width
    member_row = members + sel_row * width

    q_base = q + b * stride_qb
    k_base = k + b * stride_kb + hk * stride_kh
    v_base = v + b * stride_vb + hk * stride_vh
    q_rows = tok * stride_qt + h * stride_qh
    offs_k = tl.arange(0, BLOCK_K)
    cols_v = pid_dv * TILE_DV + tl.arange(0, TILE_DV)
    if NUM_DK == 1:
        q1, q2 = load_parts(q_base, q_rows, row_ok, 0, DK, stride_qd, DK1, DK2)  # [BR, DK1|DK2]

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, TILE_DV], dtype=tl.float32)
    for j in range(0, tl.load(counts + sel_row)):
        block = tl.load(union_row + j)
        chose = ((tl.load(member_row + j) >> row_q) & 1) != 0  # [BR] rows whose query chose it
        key = block * BLOCK_SIZE + offs_k  # [BK] positions inside the sequence
        k_ok = (offs_k < BLOCK_SIZE) & (key < length + q_offset)
        k_rows = (bos + key).to(tl.int64) * stride_kt
        v_rows = (bos + key).to(tl.int64) * stride_vt
        if NUM_DK == 1:
            k1, k2 = load_parts(k_base, k_rows, k_ok, 0, DK, stride_kd, DK1, DK2)
            s = dot_parts(q1, q2, k1, k2, DK2, PRECISION)  # [BR, BK]
        else:
            s = dot_rows(
                q_base, q_rows, row_ok, stride_qd, k_base, k_rows, k_ok, stride_kd,
                DK, BLOCK_DK, NUM_DK, BLOCK_R, BLOCK_K, PRECISION,
            )
        visible = (chose & row_ok)[:, None] & k_ok[None, :]
        visible = visible & (key[None, :] <= q_offset + t[:, None])
        s = tl.where(visible, s * scale_log2, float("-inf"))  # [BR, BK], base-2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_tile = tl.load(
            v_base + v_rows[:, None] + cols_v[None, :] * stride_vd,
            mask=k_ok[:, None] & (cols_v < DV)[None, :], other=0.0,
        )  # [BK, TILE_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse_row = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    if pid_dv == 0:
        tl.store(lse + (b * seq_len + tok) * HQ + h, lse_row, mask=row_ok)
    o_rows = b * stride_ob + tok * stride_ot + h * stride_oh
    o_ptr = o + o_rows[:, None] + cols_v[None, :] * stride_od
    out = acc / l_safe[:, None]
    tl.store(o_ptr, out.to(o.dtype.element_ty), mask=row_ok[:, None] & (cols_v < DV)[None, :])


@triton.jit
def _fwd_key_major_kernel(
    q, k, v, ref, o_acc, l_acc, l_dot, redo, redo_any, items, queries, tiles, cu_seqlens,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    seq_len, num_blocks, q_offset, scale_log2,
    HQ: tl.constexpr, OWNERS: tl.constexpr, KV_PER_OWNER: tl.constexpr,
    SEL_PER_OWNER: tl.constexpr, KV_GROUP: tl.constexpr, UNIT: tl.constexpr,
    UNIT_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    ROWS_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DK1: tl.constexpr, DK2: tl.constexpr, BLOCK_DV: tl.constexpr, PACKED: tl.constexpr,
    PRECISION: tl.constexpr, ROW_MAX: tl.constexpr, REDO: tl.constexpr,
):
    """The forward from one key block of one KV head and one piece of its query list (work
    items as for dK/dV). Rows are (entry, head); `ref` holds one base-2 value per
    [B, T, HQ] row, whose softmax terms are exp2(s - ref[row]), none above 1.

    Sums (ROW_MAX false): this block's P V is added into the fp32 [B, T, HQ, DV] buffer
    o_acc, the sum of P into l_acc and the sum of P as the dot product read it (in V's dtype)
    into l_dot (both [B, T, HQ]); after, o = o_acc / l_dot (weights that sum to 1 exactly)
    and lse = ref + log2(l_acc).
    Row maxima (ROW_MAX): the largest score of each row over this block's visible keys goes
    into `ref` with an atomic max, which makes `ref` the rows' exact maxima for the sums.
    REDO: only rows flagged in `redo` [B, T, HQ] take part, and the launch does nothing unless
    `redo_any` is set, so the host need not read the flags back. DK is held in its two parts
    DK1 + DK2."""
    item = items + 4 * tl.program_id(0).to(tl.int64)
    seg = tl.load(item)
    if seg < 0:  # padding (see `split_work`)
        return
    if REDO:
        if tl.load(redo_any) == 0:
            return
    lo = tl.load(item + 1)
    end = tl.load(item + 2)
    kv_sub = tl.program_id(1)
    b, hk, bos, key, k_ok = _key_block(
        seg, kv_sub, tiles, cu_seqlens, seq_len, num_blocks, q_offset,
        OWNERS, KV_PER_OWNER, BLOCK_SIZE, BLOCK_K, PACKED,
    )
    offs_dv = tl.arange(0, BLOCK_DV)
    k_rows = (bos + key).to(tl.int64) * stride_kt
    k1, k2 = load_parts(k + b * stride_kb + hk * stride_kh, k_rows, k_ok, 0, DK, stride_kd,
                        DK1, DK2)  # [BK, DK1|DK2]
    if not ROW_MAX:
        v_rows = (bos + key).to(tl.int64) * stride_vt
        v_tile = load_rows(v + b * stride_vb + hk * stride_vh, v_rows, k_ok, offs_dv, DV,
                            stride_vd)  # [BK, DV]

    q_base = q + b * stride_qb
    for step in range(lo, end, ROWS_Q):
        _, row_ok, tok, h = _list_rows(
            queries, step, end, hk, ROWS_Q, BLOCK_R, UNIT, UNIT_P, SEL_PER_OWNER, KV_GROUP
        )
        row_off = (b * seq_len + tok) * HQ + h
        if REDO:
            row_ok = row_ok & (tl.load(redo + row_off, mask=row_ok, other=0) != 0)
        q1, q2 = load_parts(q_base, tok * stride_qt + h * stride_qh, row_ok, 0, DK, stride_qd,
                            DK1, DK2)  # [BR, DK1|DK2]
        s = dot_parts(q1, q2, k1, k2, DK2, PRECISION) * scale_log2  # [BR, BK]
        visible = row_ok[:, None] & k_ok[None, :]
        visible = visible & (key[None, :] <= (q_offset + tok - bos)[:, None])
        s = tl.where(visible, s, float("-inf"))
        if ROW_MAX:
            m = tl.max(s, axis=1)
            tl.atomic_max(ref + row_off, m, mask=row_ok & (m > float("-inf")), sem="relaxed")
        else:
            p = tl.exp2(s - _saved_lse(ref, row_off, row_ok)[:, None])
            p_dot = p.to(v_tile.dtype)
            o_rows = tl.dot(p_dot, v_tile, input_precision=PRECISION)  # [BR, DV]
            o_ptr = o_acc + row_off[:, None] * DV + offs_dv[None, :]
            tl.atomic_add(o_ptr, o_rows, mask=row_ok[:, None] & (offs_dv < DV)[None, :],
                          sem="relaxed")
            tl.atomic_add(l_acc + row_off, tl.sum(p, axis=1), mask=row_ok, sem="relaxed")
            tl.atomic_add(l_dot + row_off, tl.sum(p_dot.to(tl.float32), axis=1),
                          mask=row_ok, sem="relaxed")


@triton.jit
def _row_norm_kernel(
    x, out, num_rows, seq_len, heads, stride_b, stride_t, stride_h, stride_d,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 L2 norms of the rows of x [B, T, H, D] (any strides) into out [B * T * H]."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_ok = r < num_rows
    base = (r // (heads * seq_len)) * stride_b + (r // heads % seq_len) * stride_t
    base += (r % heads) * stride_h
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x_tile = tl.load(x + base[:, None] + d[None, :] * stride_d,
                         mask=r_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x_tile * x_tile, axis=1)
    tl.store(out + r, tl.sqrt(acc), mask=r_ok)


@triton.jit
def _delta_kernel(o, do, delta, num_rows, DV: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 over contiguous [rows, DV] o and dO."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    rows = r.to(tl.int64) * DV
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, DV, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        o_t = load_rows(o, rows, r_ok, cols, DV, 1).to(tl.float32)
        do_t = load_rows(do, rows, r_ok, cols, DV, 1).to(tl.float32)
        acc += tl.sum(o_t * do_t, axis=1)
    tl.store(delta + r, acc, mask=r_ok)


@triton.jit
def _dq_kernel(
    q, k, v, do, lse, delta, dq, union, members, counts, tiles, cu_seqlens,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    seq_len, num_tiles, width, q_offset, scale, scale_log2,
    HQ: tl.constexpr, HI: tl.constexpr, UNITS: tl.constexpr, UNIT: tl.constexpr,
    UNIT_P: tl.constexpr, KV_GROUP: tl.constexpr, SEL_GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    PACKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of BLOCK_Q queries x one unit of heads (x one DK tile, in parts DK1 + DK2); the `o`
    strides are dO's."""
    pid_tile = tl.program_id(0)
    pid_dk = tl.program_id(2)
    b = (tl.program_id(1) // UNITS).to(tl.int64)
    u = tl.program_id(1) % UNITS
    if PACKED:
        first, bos, length = _tile_start(tiles, cu_seqlens, pid_tile, BLOCK_Q)
    else:
        first, bos, length = pid_tile * BLOCK_Q, 0, seq_len
    # Row r: query first + r // UNIT_P (inside its sequence) of head u * UNIT + r % UNIT_P.
    row_q = tl.arange(0, BLOCK_R) // UNIT_P
    t = first + row_q
    h = (u * UNIT + tl.arange(0, BLOCK_R) % UNIT_P).to(tl.int64)
    row_ok = (row_q < BLOCK_Q) & (tl.arange(0, BLOCK_R) % UNIT_P < UNIT) & (t < length)
    hk = (u * UNIT // KV_GROUP).to(tl.int64)
    tok = (bos + t).to(tl.int64)
    sel_row = (b * num_tiles + pid_tile) * HI + u * UNIT // SEL_GROUP
    union_row = union + sel_row * width
    member_row = members + sel_row * width

    q_base = q + b * stride_qb
    do_base = do + b * stride_ob
    k_base = k + b * stride_kb + hk * stride_kh
    v_base = v + b * stride_vb + hk * stride_vh
    q_rows = tok * stride_qt + h * stride_qh
    do_rows = tok * stride_ot + h * stride_oh
    row_off = (b * seq_len + tok) * HQ + h
    lse_row = _saved_lse(lse, row_off, row_ok)
    delta_row = tl.load(delta + row_off, mask=row_ok, other=0.0)

    offs_k = tl.arange(0, BLOCK_K)
    offs_dv = tl.arange(0, BLOCK_DV)
    col0 = pid_dk * DK1  # the accumulator tile's first column
    if NUM_DK == 1:
        q1, q2 = load_parts(q_base, q_rows, row_ok, 0, DK, stride_qd, DK1, DK2)  # [BR, DK1|DK2]
    if NUM_DV == 1:
        do_tile = load_rows(do_base, do_rows, row_ok, offs_dv, DV, stride_od)  # [BR, DV]

    acc1 = tl.zeros([BLOCK_R, DK1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, DK2 if DK2 > 0 else 16], dtype=tl.float32)
    for j in range(0, tl.load(counts + sel_row)):
        block = tl.load(union_row + j)
        chose = ((tl.load(member_row + j) >> row_q) & 1) != 0
        key = block * BLOCK_SIZE + offs_k
        k_ok = (offs_k < BLOCK_SIZE) & (key < length + q_offset)
        k_rows = (bos + key).to(tl.int64) * stride_kt
        v_rows = (bos + key).to(tl.int64) * stride_vt
        k1, k2 = load_parts(k_base, k_rows, k_ok, col0, DK, stride_kd, DK1, DK2)  # [BK, DK1|DK2]
        if NUM_DK == 1:
            s = dot_parts(q1, q2, k1, k2, DK2, PRECISION)  # [BR, BK]
        else:
            s = dot_rows(
                q_base, q_rows, row_ok, stride_qd, k_base, k_rows, k_ok, stride_kd,
                DK, BLOCK_DK, NUM_DK, BLOCK_R, BLOCK_K, PRECISION,
            )
        if NUM_DV == 1:
            v_tile = tl.load(
                v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd,
                mask=k_ok[:, None] & (offs_dv < DV)[None, :], other=0.0,
            )  # [BK, DV]
            dp = tl.dot(do_tile, tl.trans(v_tile), input_precision=PRECISION)
        else:
            dp = dot_rows(
                do_base, do_rows, row_ok, stride_od, v_base, v_rows, k_ok, stride_vd,
                DV, BLOCK_DV, NUM_DV, BLOCK_R, BLOCK_K, PRECISION,
            )
        visible = (chose & row_ok)[:, None] & k_ok[None, :]
        visible = visible & (key[None, :] <= q_offset + t[:, None])
        p = tl.where(visible, tl.exp2(s * scale_log2 - lse_row[:, None]), 0.0)  # [BR, BK]
        ds = (p * (dp - delta_row[:, None])).to(k1.dtype)
        acc1 += tl.dot(ds, k1, input_precision=PRECISION)
        if DK2 > 0:
            acc2 += tl.dot(ds, k2, input_precision=PRECISION)

    store_parts(dq + b * stride_dqb, tok * stride_dqt + h * stride_dqh, row_ok, col0, DK,
                stride_dqd, acc1 * scale, acc2 * scale, DK1, DK2)


@triton.jit
def _add_dq(dq_rows, row_ok, ds_t, k1, k2, scale, DK: tl.constexpr, DK1: tl.constexpr,
            DK2: tl.constexpr, PRECISION: tl.constexpr):
    """dq_rows[:, :DK] += scale dS^T K with relaxed fp32 atomics, K held in its two parts
    (`load_parts`); dq_rows [BR, 1] points at the rows of the fp32 dQ buffer."""
    cols = tl.arange(0, DK1)
    dq_part = tl.dot(ds_t, k1, input_precision=PRECISION) * scale  # [BR, DK1]
    tl.atomic_add(dq_rows + cols[None, :], dq_part, mask=row_ok[:, None] & (cols < DK)[None, :],
                  sem="relaxed")
    if DK2 > 0:
        cols = DK1 + tl.arange(0, DK2)
        dq_part = tl.dot(ds_t, k2, input_precision=PRECISION) * scale  # [BR, DK2]
        tl.atomic_add(dq_rows + cols[None, :], dq_part,
                      mask=row_ok[:, None] & (cols < DK)[None, :], sem="relaxed")


@triton.jit
def _dkv_kernel(
    q, k, v, do, lse, delta, dk, dv, dq_acc, part_k, part_v, items, queries, tiles, cu_seqlens,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_pks, stride_pkh, stride_pkt, stride_pkd,
    stride_pvs, stride_pvh, stride_pvt, stride_pvd,
    seq_len, num_blocks, q_offset, scale, scale_log2,
    HQ: tl.constexpr, OWNERS: tl.constexpr, KV_PER_OWNER: tl.constexpr,
    SEL_PER_OWNER: tl.constexpr, KV_GROUP: tl.constexpr, UNIT: tl.constexpr,
    UNIT_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    ROWS_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr, TILE_DV: tl.constexpr,
    PACKED: tl.constexpr, PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr,
):
    """dK/dV of one key block of one KV head (x one accumulator tile) from one piece of the
    block's query list. Work item: (segment, first entry, end, partial slot or -1); segment =
    (b * OWNERS + owner) * num_blocks + block. A list entry is token * SEL_PER_OWNER + the
    selection head inside the owner; each step takes ROWS_Q entries x UNIT heads as rows.
    The dK tile is held in its two parts DK1 + DK2. With DQ_ATOMIC (whole head dims only)
    each step also adds its rows' dQ share, dS K, into the fp32 [B, T, HQ, DK] buffer
    `dq_acc`."""
    item = items + 4 * tl.program_id(0).to(tl.int64)
    seg = tl.load(item)
    if seg < 0:  # padding (see `split_work`)
        return
    lo = tl.load(item + 1)
    end = tl.load(item + 2)
    slot = tl.load(item + 3)
    kv_sub = tl.program_id(1)
    acc_tile = tl.program_id(2)
    b, hk, bos, key, k_ok = _key_block(
        seg, kv_sub, tiles, cu_seqlens, seq_len, num_blocks, q_offset,
        OWNERS, KV_PER_OWNER, BLOCK_SIZE, BLOCK_K, PACKED,
    )
    offs_k = tl.arange(0, BLOCK_K)
    k_base = k + b * stride_kb + hk * stride_kh
    v_base = v + b * stride_vb + hk * stride_vh
    k_rows = (bos + key).to(tl.int64) * stride_kt
    v_rows = (bos + key).to(tl.int64) * stride_vt
    offs_dv = tl.arange(0, BLOCK_DV)
    col0 = acc_tile * DK1  # the dK tile's first column
    cols_v = acc_tile * TILE_DV + tl.arange(0, TILE_DV)
    if NUM_DK == 1:
        k1, k2 = load_parts(k_base, k_rows, k_ok, 0, DK, stride_kd, DK1, DK2)  # [BK, DK1|DK2]
    if NUM_DV == 1:
        v_tile = load_rows(v_base, v_rows, k_ok, offs_dv, DV, stride_vd)  # [BK, DV]

    q_base = q + b * stride_qb
    do_base = do + b * stride_ob
    dk1 = tl.zeros([BLOCK_K, DK1], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_K, DK2 if DK2 > 0 else 16], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_K, TILE_DV], dtype=tl.float32)
    for step in range(lo, end, ROWS_Q):
        _, row_ok, tok, h = _list_rows(
            queries, step, end, hk, ROWS_Q, BLOCK_R, UNIT, UNIT_P, SEL_PER_OWNER, KV_GROUP
        )
        q_rows = tok * stride_qt + h * stride_qh
        do_rows = tok * stride_ot + h * stride_oh
        row_off = (b * seq_len + tok) * HQ + h
        lse_row = _saved_lse(lse, row_off, row_ok)
        delta_row = tl.load(delta + row_off, mask=row_ok, other=0.0)
        q1, q2 = load_parts(q_base, q_rows, row_ok, col0, DK, stride_qd, DK1, DK2)
        do_t = tl.load(
            do_base + do_rows[:, None] + cols_v[None, :] * stride_od,
            mask=row_ok[:, None] & (cols_v < DV)[None, :], other=0.0,
        )  # [BR, TILE_DV]
        if NUM_DK == 1:
            s = dot_parts(k1, k2, q1, q2, DK2, PRECISION)  # [BK, BR]
        else:
            s = dot_rows(
                k_base, k_rows, k_ok, stride_kd, q_base, q_rows, row_ok, stride_qd,
                DK, BLOCK_DK, NUM_DK, BLOCK_K, BLOCK_R, PRECISION,
            )
        if NUM_DV == 1:
            dp = tl.dot(v_tile, tl.trans(do_t), input_precision=PRECISION)  # [BK, BR]
        else:
            dp = dot_rows(
                v_base, v_rows, k_ok, stride_vd, do_base, do_rows, row_ok, stride_od,
                DV, BLOCK_DV, NUM_DV, BLOCK_K, BLOCK_R, PRECISION,
            )
        visible = k_ok[:, None] & row_ok[None, :]
        visible = visible & (key[:, None] <= (q_offset + tok - bos)[None, :])
        p = tl.where(visible, tl.exp2(s * scale_log2 - lse_row[None, :]), 0.0)  # [BK, BR]
        dv_acc += tl.dot(p.to(do_t.dtype), do_t, input_precision=PRECISION)
        ds = (p * (dp - delta_row[None, :])).to(q1.dtype)
        dk1 += tl.dot(ds, q1, input_precision=PRECISION)
        if DK2 > 0:
            dk2 += tl.dot(ds, q2, input_precision=PRECISION)
        if DQ_ATOMIC:
            _add_dq(dq_acc + row_off[:, None] * DK, row_ok, tl.trans(ds), k1, k2, scale, DK, DK1,
                    DK2, PRECISION)

    # The whole list: the gradient itself. A piece of it: an fp32 partial sum in `slot`.
    mask_v = k_ok[:, None] & (cols_v < DV)[None, :]
    if slot < 0:
        tok_k = (bos + key).to(tl.int64)
        store_parts(dk + b * stride_dkb + hk * stride_dkh, tok_k * stride_dkt, k_ok, col0, DK,
                    stride_dkd, dk1 * scale, dk2 * scale, DK1, DK2)
        dv_ptr = dv + b * stride_dvb + hk * stride_dvh + tok_k[:, None] * stride_dvt
        tl.store(dv_ptr + cols_v[None, :] * stride_dvd, dv_acc.to(dv.dtype.element_ty),
                 mask=mask_v)
    else:
        store_parts(part_k + slot * stride_pks + kv_sub * stride_pkh, offs_k * stride_pkt, k_ok,
                    col0, DK, stride_pkd, dk1 * scale, dk2 * scale, DK1, DK2)
        pv_ptr = part_v + slot * stride_pvs + kv_sub * stride_pvh + offs_k[:, None] * stride_pvt
        tl.store(pv_ptr + cols_v[None, :] * stride_pvd, dv_acc, mask=mask_v)


@triton.jit
def _sum_parts(
    part, out, slot_lo, slot_hi, kv_sub, key_ok, out_rows, stride_ps, stride_ph, stride_pt,
    stride_pd, stride_od, D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[rows] = sum over slots [slot_lo, slot_hi) of part[slot, kv_sub], in slot order."""
    offs_k = tl.arange(0, BLOCK_K)
    for c in tl.static_range(0, D, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        mask = key_ok[:, None] & (cols < D)[None, :]
        ptr = part + kv_sub * stride_ph + offs_k[:, None] * stride_pt + cols[None, :] * stride_pd
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for s in range(slot_lo, slot_hi):
            acc += tl.load(ptr + s * stride_ps, mask=mask, other=0.0)
        tl.store(out + out_rows[:, None] + cols[None, :] * stride_od,
                 acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _dkv_reduce_kernel(
    part_k, part_v, dk, dv, splits, tiles, cu_seqlens,
    stride_pks, stride_pkh, stride_pkt, stride_pkd,
    stride_pvs, stride_pvh, stride_pvt, stride_pvd,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    seq_len, num_blocks, q_offset,
    OWNERS: tl.constexpr, KV_PER_OWNER: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PACKED: tl.constexpr,
):
    """dK/dV of a key block whose query list was split: (segment, first slot, end slot)."""
    split = splits + 3 * tl.program_id(0).to(tl.int64)
    seg = tl.load(split)
    if seg < 0:  # padding (see `split_work`)
        return
    slot_lo = tl.load(split + 1)
    slot_hi = tl.load(split + 2)
    kv_sub = tl.program_id(1)
    b, hk, bos, key, key_ok = _key_block(
        seg, kv_sub, tiles, cu_seqlens, seq_len, num_blocks, q_offset,
        OWNERS, KV_PER_OWNER, BLOCK_SIZE, BLOCK_K, PACKED,
    )
    tok = (bos + key).to(tl.int64)
    _sum_parts(
        part_k, dk + b * stride_dkb + hk * stride_dkh, slot_lo, slot_hi, kv_sub, key_ok,
        tok * stride_dkt, stride_pks, stride_pkh, stride_pkt, stride_pkd, stride_dkd,
        DK, BLOCK_K, BLOCK_D,
    )
    _sum_parts(
        part_v, dv + b * stride_dvb + hk * stride_dvh, slot_lo, slot_hi, kv_sub, key_ok,
        tok * stride_dvt, stride_pvs, stride_pvh, stride_pvt, stride_pvd, stride_dvd,
        DV, BLOCK_K, BLOCK_D,
    )


# ----------------------------------------------------------------------------------------------
# Inverse index and work split (torch ops)


def usable_indices(
    block_indices: torch.Tensor, block_size: int, layout: SeqLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Each row's indices sorted [B, T, HI, n] (int64) and which of them count: not -1, not a
    repeat, not after the query's own block (such a block has no key j <= t). Also the global
    id of each token's document's block 0 [T] and the number of key blocks in all."""
    t_rel, first_block, num_blocks = layout.token_blocks(block_size, block_indices.device)
    idx = block_indices.long().sort(dim=-1).values
    valid = (idx >= 0) & (idx <= (t_rel // block_size)[None, :, None, None])
    valid[..., 1:] &= idx[..., 1:] != idx[..., :-1]
    return idx, valid, first_block, num_blocks


def tile_unions(
    block_indices: torch.Tensor, block_size: int, block_q: int, layout: SeqLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks that the queries of each tile of `block_q` tokens chose, for the forward
    and dQ loops.

    Returns union int32 [B, NT, HI, W] (distinct blocks, ascending, first `count` valid),
    members int32 [B, NT, HI, W] (bit i set when the tile's query i chose the block) and
    counts int32 [B, NT, HI], with W = block_q * n and tiles as in `layout.tiles(block_q)`.
    """
    idx, valid, _, _ = usable_indices(block_indices, block_size, layout)
    batch, _, sel_heads, n = idx.shape
    tokens, exists = layout.tile_tokens(block_q, idx.device)  # [NT, Q]
    tokens = tokens.clamp(max=max(layout.seq_len - 1, 0))
    num_tiles = tokens.shape[0]
    keep = valid[:, tokens] & exists[None, :, :, None, None]  # [B, NT, Q, HI, n]
    absent = torch.iinfo(torch.int32).max  # sorts after every block
    blocks = torch.where(keep, idx[:, tokens], absent)
    bits = torch.where(keep, 1 << torch.arange(block_q, device=idx.device)[:, None, None], 0)
    shape = (batch, num_tiles, sel_heads, block_q * n)
    blocks = blocks.permute(0, 1, 3, 2, 4).reshape(shape)
    bits = bits.permute(0, 1, 3, 2, 4).reshape(shape)
    blocks, order = blocks.sort(dim=-1)
    bits = bits.gather(-1, order)
    first = torch.ones_like(blocks, dtype=torch.bool)
    first[..., 1:] = blocks[..., 1:] != blocks[..., :-1]
    run = torch.cumsum(first, -1) - 1  # distinct block number of each entry
    union = torch.zeros_like(blocks).scatter_(-1, run, blocks)
    members = torch.zeros_like(bits).scatter_add_(-1, run, bits)  # a query chose it once
    counts = (first & (blocks != absent)).sum(-1)
    return union.to(torch.int32), members.to(torch.int32), counts.to(torch.int32)


@dataclass(frozen=True)
class InverseIndex:
    """CSR of the queries that chose each key block (see `inverse_index`)."""

    offsets: torch.Tensor  # int64 [B * owners * num_blocks + 1]
    entries: torch.Tensor  # [E] token * sel_per_owner + selection head inside the owner
    num_blocks: int
    chosen: torch.Tensor | None = None  # bool [B, T, HI]: rows with a usable choice (a key)


def inverse_index(
    block_indices: torch.Tensor,
    block_size: int,
    heads: HeadLayout,
    layout: SeqLayout,
) -> InverseIndex:
    """For block_indices [B, T, HI, n]: segment (b * owners + owner) * num_blocks + block
    lists its entries in ascending order (int32 when they fit); only `usable_indices` count,
    blocks numbered globally over the packed documents.

    No host synchronisation: `entries` keeps one slot per choice, B * T * HI * n, the
    unusable ones sorted after `offsets[-1]`, where no list reaches them.
    """
    batch, seqlen, sel_heads, _ = block_indices.shape
    device = block_indices.device
    idx, valid, first_block, num_blocks = usable_indices(block_indices, block_size, layout)
    spo = heads.sel_per_owner
    num_segments = batch * heads.owners * num_blocks
    sel = torch.arange(sel_heads, device=device)
    owner = (torch.arange(batch, device=device)[:, None] * heads.owners + sel // spo)
    segment = (owner[:, None, :, None] * num_blocks + first_block[None, :, None, None] + idx)
    segment = torch.where(valid, segment, num_segments).flatten()  # unusable: after the rest
    entry = torch.arange(seqlen, device=device)[:, None] * spo + sel % spo  # [T, HI]
    segment, order = torch.sort(segment, stable=True)
    entry_dtype = torch.int32 if seqlen * spo < 2**31 else torch.int64
    entries = entry[None, :, :, None].expand_as(valid).flatten()[order].to(entry_dtype)
    bounds = torch.arange(num_segments + 1, device=device)
    offsets = torch.searchsorted(segment, bounds)  # entries of segments before each one
    return InverseIndex(offsets, entries, num_blocks, valid.any(-1))


def split_work(
    offsets: torch.Tensor, chunk: int, total: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cut every segment's list into pieces of at most `chunk` entries (one piece, possibly
    empty, for short lists), `total` being at least the number of entries. Returns items
    int64 [I, 4] (segment, first entry, end, partial slot or -1 when the piece is the whole
    list), splits int64 [S, 3] (segment, first slot, end slot) for the segments cut in
    several pieces, and a bound on the number of slots.

    Without a host synchronisation, so the sizes are bounds that hold for any lists of
    `total` entries; the items and splits past the real ones have segment -1, which the
    kernels skip."""
    device = offsets.device
    counts = offsets[1:] - offsets[:-1]
    segments = counts.numel()
    pieces = torch.clamp(torch.div(counts + chunk - 1, chunk, rounding_mode="floor"), min=1)
    # A segment of c entries takes at most c / chunk + 1 items, and one that is cut (c > chunk)
    # at most 2 c / chunk slots.
    num_items, num_slots = segments + total // chunk, 2 * total // chunk
    num_splits = min(segments, total // (chunk + 1))
    last_item = torch.cumsum(pieces, 0)  # one past each segment's last item
    first_item = last_item - pieces
    item = torch.arange(num_items, device=device)
    seg = torch.searchsorted(last_item, item, right=True)  # segments (past the end: padding)
    real = seg < segments
    seg = seg.clamp(max=segments - 1)
    lo = offsets[seg] + (item - first_item[seg]) * chunk
    end = torch.minimum(lo + chunk, offsets[seg + 1])
    is_part = real & (pieces[seg] > 1)
    slot = torch.cumsum(is_part, 0) - 1
    items = torch.stack(
        [torch.where(real, seg, -1), lo, end, torch.where(is_part, slot, -1)], 1
    ).contiguous()
    is_cut = pieces > 1
    cut_rank = torch.where(is_cut, torch.cumsum(is_cut, 0) - 1, num_splits)  # dump slot
    splits = torch.full((num_splits + 1, 3), -1, dtype=torch.int64, device=device)
    segment_ids = torch.arange(segments, device=device)
    slot_lo = slot[first_item]
    splits.index_put_(
        (cut_rank,), torch.stack([segment_ids, slot_lo, slot_lo + pieces], 1), accumulate=False
    )
    splits = splits[:num_splits].contiguous()
    return items, splits, num_slots


PIECES_PER_SM = 32
"""How finely `dkv_chunk` cuts the device's even share of list entries. The lists are very
uneven (block 0's holds every query, most hold a few hundred) and several programs share an
SM, so a program as long as an SM's share would run on alone long after the rest: on an H200
at 64k (the 350m preset's global layer), cutting at a 32nd of an SM's share (about 4000 entries)
made the key-major forward 37% and the backward 38% faster than at half of it (63k); a 64th
(2048) measured within 3% of it, a 16th (8192) within 8%."""


def dkv_chunk(cfg: TileConfig, entries: int, programs_per_item: int, device: torch.device) -> int:
    """Longest query list one key-block program takes: 1 / `PIECES_PER_SM` of an SM's even
    share of the work, never under 1024 entries (short lists are not worth a reduction)."""
    if cfg.dkv_chunk is not None:
        return cfg.dkv_chunk
    sms = 1
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1024, triton.cdiv(entries * programs_per_item, PIECES_PER_SM * sms))


@dataclass(frozen=True)
class KeyBlockWork:
    """An inverse index cut into the key-block programs' work items (`split_work`); the
    key-major forward builds it and the backward reuses it."""

    index: InverseIndex
    items: torch.Tensor  # int64 [I, 4]
    splits: torch.Tensor  # int64 [S, 3]
    num_slots: int

    @staticmethod
    def build(
        index: InverseIndex, cfg: TileConfig, programs_per_item: int, device: torch.device
    ) -> KeyBlockWork:
        total = index.entries.numel()
        chunk = dkv_chunk(cfg, total, programs_per_item, device)
        return KeyBlockWork(index, *split_work(index.offsets, chunk, total))


# ----------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class Problem:
    """Everything about one call that is not a tensor."""

    block_size: int  # l'
    scale: float
    heads: HeadLayout
    layout: SeqLayout
    cfg: TileConfig
    share: int = 1  # consecutive queries that share one selection (a hint)

    @property
    def unit_p(self) -> int:
        return triton.next_power_of_2(self.heads.unit)

    @property
    def block_q(self) -> int:
        """Queries per query-major program: given, or enough to fill 16 rows but at most four
        distinct selections, so that tiles whose queries chose different blocks stay cheap
        (the union of a tile's selections is what a program reads)."""
        return self.cfg.block_q or min(4 * self.share, max(1, 16 // self.unit_p))

    def key_major(self, dk: int, dv: int) -> bool:
        """Whether the forward and dQ run from the key blocks (see `TileConfig.key_major`).
        With 16 heads per unit a query tile is 16 rows of one query's selection, and the
        query-major passes measured faster (64 query heads on 4 KV heads: 139 vs 157 ms
        fwd+bwd at 64k on an H100, with dQ alone key-major)."""
        wanted = self.heads.unit < 16 if self.cfg.key_major is None else self.cfg.key_major
        return wanted and max(dk, dv) <= self.cfg.head_tile

    def unit_constants(self) -> dict[str, int]:
        """Row layout shared by the forward and dQ kernels."""
        heads = self.heads
        return dict(
            HQ=heads.heads, HI=heads.sel_heads, UNITS=heads.units, UNIT=heads.unit,
            UNIT_P=self.unit_p, KV_GROUP=heads.heads // heads.kv_heads,
            SEL_GROUP=heads.heads // heads.sel_heads, BLOCK_SIZE=self.block_size,
            BLOCK_Q=self.block_q,
            BLOCK_R=max(16, triton.next_power_of_2(self.block_q * self.unit_p)),
            BLOCK_K=max(16, triton.next_power_of_2(self.block_size)),
        )


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    unions: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    prob: Problem,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-major forward: (o [B, T, HQ, DV], lse [B, T, HQ] fp32 in base 2, -inf on rows
    that see no key); `unions` is `tile_unions(...)` for prob.block_q."""
    batch, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    o = q.new_empty(batch, seqlen, heads, dv)
    lse = torch.empty(batch, seqlen, heads, dtype=torch.float32, device=q.device)
    tiles, n_tiles = prob.layout.tiles(prob.block_q, q.device)
    if n_tiles == 0 or batch == 0:
        return o, lse
    union, members, counts = unions
    ksplit, vsplit = prob.cfg.split(dk), prob.cfg.split(dv)
    _fwd_kernel[(n_tiles, batch * prob.heads.units, vsplit.tiles)](
        q, k, v, o, lse, union, members, counts, tiles, prob.layout.cu_seqlens,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        seqlen, n_tiles, union.shape[-1], prob.layout.q_offset, prob.scale * LOG2E,
        DK=dk, DV=dv, BLOCK_DK=ksplit.block, NUM_DK=ksplit.chunks, DK1=ksplit.parts[0],
        DK2=ksplit.parts[1], TILE_DV=vsplit.tile,
        PACKED=prob.layout.packed, PRECISION=dot_precision(q.dtype),
        num_warps=prob.cfg.num_warps, num_stages=prob.cfg.num_stages,
        **prob.unit_constants(),
    )
    return o, lse


BOUND_SLACK = 64.0
"""How far (base 2) a row's scores may sit below its bound in the key-major forward: while
its sum of exp2(s - bound) is at least 2^-64, a term fp32 loses to underflow (below 2^-126)
is at most 2^-62 of the sum. Rows with a smaller sum are summed again against their exact
maximum."""


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norms over the last dim of x [B, T, H, D] -> [B, T, H], in one pass over x
    (torch's norm reduction of bf16 rows this short reads at a fraction of the bandwidth)."""
    out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    num_rows, block_r = out.numel(), 64
    if num_rows:
        _row_norm_kernel[(triton.cdiv(num_rows, block_r),)](
            x, out, num_rows, x.shape[1], x.shape[2], *x.stride(), D=x.shape[-1],
            BLOCK_R=block_r, BLOCK_D=min(triton.next_power_of_2(x.shape[-1]), 128),
        )
    return out


def score_bound(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """An upper bound of every base-2 score of each row, [B, T, HQ] fp32 (Cauchy-Schwarz):
    |scale| log2(e) ||q_row|| max_j ||k_j|| over the row's KV head."""
    q_norm = row_norms(q)  # [B, T, HQ]
    if k.shape[1] == 0:
        return torch.zeros_like(q_norm)
    k_max = row_norms(k).amax(dim=1)  # [B, HK]
    k_max = k_max.repeat_interleave(q.shape[2] // k.shape[2], dim=1)  # [B, HQ]
    return q_norm * k_max[:, None, :] * (abs(scale) * LOG2E)


def attention_forward_key_major(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, work: KeyBlockWork, prob: Problem
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-major forward, same results as `attention_forward`, without reading anything back
    to the host.

    Each row's terms exp2(s - bound) (`score_bound`) and their P V are summed over its chosen
    blocks with atomics, then divided out. Rows whose sum of terms is under 2^-BOUND_SLACK
    (their terms near fp32 underflow) are flagged on the device, and two more launches, which
    do nothing unless a row is flagged, take those rows' exact maxima and add their terms
    against them: the sums the loose bound left are below 2^-64 of the new ones (at least 1),
    so they need no clearing. In fp16, whose P would lose bits against a loose bound, every
    row is summed against its exact maximum."""
    batch, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    layout, heads_layout, cfg = prob.layout, prob.heads, prob.cfg
    index, items = work.index, work.items
    rows = (batch, seqlen, heads)
    o_acc = torch.zeros(*rows, dv, dtype=torch.float32, device=q.device)
    l_acc, l_dot = torch.zeros(2, *rows, dtype=torch.float32, device=q.device)
    block_table, _ = layout.tiles(prob.block_size, q.device)
    rows_q = max(1, cfg.key_rows // prob.unit_p)
    ksplit = cfg.split(dk)
    launch = dict(
        HQ=heads, OWNERS=heads_layout.owners, KV_PER_OWNER=heads_layout.kv_per_owner,
        SEL_PER_OWNER=heads_layout.sel_per_owner, KV_GROUP=heads // heads_layout.kv_heads,
        UNIT=heads_layout.unit, UNIT_P=prob.unit_p, BLOCK_SIZE=prob.block_size, DK=dk, DV=dv,
        ROWS_Q=rows_q, BLOCK_R=max(16, triton.next_power_of_2(rows_q * prob.unit_p)),
        BLOCK_K=max(16, triton.next_power_of_2(prob.block_size)),
        DK1=ksplit.parts[0], DK2=ksplit.parts[1], BLOCK_DV=cfg.split(dv).block,
        PACKED=layout.packed, PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    def run(ref: torch.Tensor, row_max: bool, redo: tuple[torch.Tensor, ...] = ()) -> None:
        """One launch over every work item; with `redo` (uint8 flags [B, T, HQ] and their
        maximum), over the flagged rows only."""
        if not items.shape[0]:
            return
        flags, any_flag = redo or (l_acc, l_acc)  # not read without REDO
        _fwd_key_major_kernel[(items.shape[0], heads_layout.kv_per_owner)](
            q, k, v, ref, o_acc, l_acc, l_dot, flags, any_flag, items, index.entries,
            block_table, layout.cu_seqlens, *q.stride(), *k.stride(), *v.stride(),
            seqlen, index.num_blocks, layout.q_offset, prob.scale * LOG2E,
            ROW_MAX=row_max, REDO=bool(redo), **launch,
        )

    # Rows that see a key (index.chosen is per selection head).
    seen = index.chosen.repeat_interleave(heads // index.chosen.shape[2], dim=2)
    row_max = torch.full(rows, -math.inf, dtype=torch.float32, device=q.device)
    if q.dtype == torch.float16:
        run(row_max, row_max=True)
        ref = row_max
        run(ref, row_max=False)
    else:
        bound = score_bound(q, k, prob.scale)
        run(bound, row_max=False)
        # sum P >= its largest term, so a row with a larger sum is far from underflow.
        redo = seen & (l_acc < 2.0**-BOUND_SLACK)
        flags = redo.view(torch.uint8)
        redo_rows = (flags, flags.amax())
        run(row_max, row_max=True, redo=redo_rows)
        ref = torch.where(redo, row_max, bound)
        run(ref, row_max=False, redo=redo_rows)
    lse = torch.where(seen, ref + torch.log2(torch.where(seen, l_acc, 1.0)), -math.inf)
    return (o_acc / torch.where(seen, l_dot, 1.0)[..., None]).to(q.dtype), lse


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    block_indices: torch.Tensor,
    unions: tuple[torch.Tensor, ...],
    prob: Problem,
    work: KeyBlockWork | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): delta, then dK/dV (and dQ when `Problem.key_major`) per key block;
    `unions` (as for the forward) are needed only by the query-major dQ pass, `work` (the
    key-major forward's) is built when not given."""
    batch, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    cfg, heads_layout, layout = prob.cfg, prob.heads, prob.layout
    do = do.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv_out = torch.empty_like(v, memory_format=torch.contiguous_format)
    if batch * seqlen == 0:
        return dq, dk_out.zero_(), dv_out.zero_()
    ksplit, vsplit = cfg.split(dk), cfg.split(dv)
    precision = dot_precision(q.dtype)

    delta = torch.empty_like(lse)  # [B, T, HQ] fp32
    rows, block_r = batch * seqlen * heads, 64
    _delta_kernel[(triton.cdiv(rows, block_r),)](
        o, do, delta, rows, DV=dv, BLOCK_R=block_r, BLOCK_D=min(vsplit.tile, 128),
    )

    common = dict(
        DK=dk, DV=dv, BLOCK_DK=ksplit.block, NUM_DK=ksplit.chunks, DK1=ksplit.parts[0],
        DK2=ksplit.parts[1],
        BLOCK_DV=vsplit.block, NUM_DV=vsplit.chunks, PACKED=layout.packed, PRECISION=precision,
        num_warps=cfg.bwd_warps, num_stages=cfg.num_stages,
    )
    key_major = prob.key_major(dk, dv)
    if key_major:
        dq_acc = torch.zeros(batch, seqlen, heads, dk, dtype=torch.float32, device=q.device)
    else:
        dq_acc = dq  # unused by the kernel
        union, members, counts = unions
        tiles, n_tiles = layout.tiles(prob.block_q, q.device)
        _dq_kernel[(n_tiles, batch * heads_layout.units, ksplit.tiles)](
            q, k, v, do, lse, delta, dq, union, members, counts, tiles, layout.cu_seqlens,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            seqlen, n_tiles, union.shape[-1], layout.q_offset, prob.scale, prob.scale * LOG2E,
            **prob.unit_constants(), **common,
        )

    acc_tiles = max(ksplit.tiles, vsplit.tiles)
    if work is None:
        index = inverse_index(block_indices, prob.block_size, heads_layout, layout)
        work = KeyBlockWork.build(index, cfg, heads_layout.kv_per_owner * acc_tiles, q.device)
    entries, num_blocks = work.index.entries, work.index.num_blocks
    items, splits, num_slots = work.items, work.splits, work.num_slots
    part_shape = (max(num_slots, 1), heads_layout.kv_per_owner, prob.block_size)
    part_k = torch.empty(*part_shape, dk, dtype=torch.float32, device=q.device)
    part_v = torch.empty(*part_shape, dv, dtype=torch.float32, device=q.device)
    block_table, _ = layout.tiles(prob.block_size, q.device)
    rows_q = max(1, cfg.dkv_rows // prob.unit_p)
    block_k = max(16, triton.next_power_of_2(prob.block_size))
    _dkv_kernel[(items.shape[0], heads_layout.kv_per_owner, acc_tiles)](
        q, k, v, do, lse, delta, dk_out, dv_out, dq_acc, part_k, part_v, items, entries,
        block_table, layout.cu_seqlens,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_out.stride(),
        *dv_out.stride(), *part_k.stride(), *part_v.stride(),
        seqlen, num_blocks, layout.q_offset, prob.scale, prob.scale * LOG2E,
        HQ=heads, OWNERS=heads_layout.owners, KV_PER_OWNER=heads_layout.kv_per_owner,
        SEL_PER_OWNER=heads_layout.sel_per_owner, KV_GROUP=heads // heads_layout.kv_heads,
        UNIT=heads_layout.unit, UNIT_P=prob.unit_p, BLOCK_SIZE=prob.block_size,
        ROWS_Q=rows_q, BLOCK_R=max(16, triton.next_power_of_2(rows_q * prob.unit_p)),
        BLOCK_K=block_k,
        TILE_DV=vsplit.tile, DQ_ATOMIC=key_major, **common,
    )
    if key_major:
        dq.copy_(dq_acc)
    if splits.shape[0]:
        _dkv_reduce_kernel[(splits.shape[0], heads_layout.kv_per_owner)](
            part_k, part_v, dk_out, dv_out, splits, block_table, layout.cu_seqlens,
            *part_k.stride(), *part_v.stride(), *dk_out.stride(), *dv_out.stride(),
            seqlen, num_blocks, layout.q_offset,
            OWNERS=heads_layout.owners, KV_PER_OWNER=heads_layout.kv_per_owner,
            BLOCK_SIZE=prob.block_size, DK=dk, DV=dv, BLOCK_K=block_k,
            BLOCK_D=min(64, max(ksplit.tile, vsplit.tile)),
            PACKED=layout.packed, num_warps=cfg.num_warps,
        )
    return dq, dk_out, dv_out


class SelectedAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: the forward saves the log-sum-exp (so the backward recomputes P) and
    what its passes share with the backward: the inverse index and its work items
    (key-major; whole head dims, so the same items serve dK/dV) or the query tiles' block
    unions (query-major)."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, prob):
        ctx.prob = prob
        if prob.key_major(q.shape[-1], v.shape[-1]):
            index = inverse_index(block_indices, prob.block_size, prob.heads, prob.layout)
            work = KeyBlockWork.build(index, prob.cfg, prob.heads.kv_per_owner, q.device)
            o, lse = attention_forward_key_major(q, k, v, work, prob)
            ctx.num_blocks, ctx.num_slots = index.num_blocks, work.num_slots
            ctx.save_for_backward(
                q, k, v, o, lse, block_indices, index.offsets, index.entries, work.items,
                work.splits,
            )
            return o
        unions = tile_unions(block_indices, prob.block_size, prob.block_q, prob.layout)
        o, lse = attention_forward(q, k, v, unions, prob)
        ctx.save_for_backward(q, k, v, o, lse, block_indices, *unions)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_indices, *shared = ctx.saved_tensors
        work, unions = None, tuple(shared)
        if ctx.prob.key_major(q.shape[-1], v.shape[-1]):
            offsets, entries, items, splits = shared
            index = InverseIndex(offsets, entries, ctx.num_blocks)
            work, unions = KeyBlockWork(index, items, splits, ctx.num_slots), ()
        dq, dk, dv = attention_backward(
            do, q, k, v, o, lse, block_indices, unions, ctx.prob, work
        )
        return dq, dk, dv, None, None


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    select_block_size: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    tiles: TileConfig | None = None,
    q_offset: int = 0,
    selection_query_block: int = 1,
    deterministic: bool = False,
) -> torch.Tensor:
    """Same contract as `reference.selected_attention`, on the Triton kernels.

    q [B, T, HQ, DK], k [B, o + T, HK, DK], v [B, o + T, HK, DV], block_indices
    [B, T, HI, n] (-1 = none; document-relative with cu_seqlens) -> o [B, T, HQ, DV], 0 on
    rows whose selection holds no key j <= t (o = `q_offset`, query row i at t = o + i).
    Inputs are assumed checked by the public op; HK and HI must divide one another. `tiles`
    overrides the tile sizes (see `default_tiles`); without it, `selection_query_block` (the
    queries that share one selection) sizes the query tiles (see `Problem.block_q`).
    `deterministic` forces the query-major forward and dQ (no atomics anywhere).
    """
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"selected_attention (triton) does not support dtype {q.dtype}")
    heads = HeadLayout.build(q.shape[2], k.shape[2], block_indices.shape[2])
    if tiles is not None and tiles.block_q is not None and not 1 <= tiles.block_q <= 31:
        raise ValueError(f"block_q={tiles.block_q} must be in [1, 31] (an int32 query bitmask)")
    cfg = tiles or default_tiles(q.device, q.dtype, q.shape[-1], v.shape[-1])
    prob = Problem(
        block_size=select_block_size,
        scale=softmax_scale(scale, q.shape[-1]),
        heads=heads,
        layout=SeqLayout.build(q.shape[1], cu_seqlens, q.device, q_offset),
        cfg=replace(cfg, key_major=False) if deterministic else cfg,
        share=selection_query_block,
    )
    return SelectedAttentionFunction.apply(q, k, v, block_indices.to(q.device), prob)
