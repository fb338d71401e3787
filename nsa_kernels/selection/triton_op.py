"""Triton kernel for block importance and top-n selection, without a T x N score matrix.

A program owns a tile of query blocks (selection_query_block consecutive queries each) and one
selection group. A query block shares the selection of its first query (the reference explains
why), so the program scores only those rows. It walks the selection blocks they may pick in
steps of W (the running top-n width, a power of two >= n). For each step it recomputes, per
head of the group, p_cmp = exp(q . k_cmp * scale - lse) over the W * l'/s compressed blocks
that start inside the step, with the log-sum-exp of compressed attention (passed in, or
computed in a first pass), sums them over the heads, and maps them onto the
step's selection blocks with the overlap weights (in strides). A compressed block that reaches
past the step adds its share to the next step's first block (l <= l', so it reaches at most
one block further). Forced and causal rules follow, and the step's W candidates are merged
into the running top-n held in registers: candidates and running set are (score, block) keys
packed into int64 (score bits high, block index low; scores are >= 0, so their bits order like
the floats), so ordering by key is ordering by score with ties going to the more recent block,
as in the reference. The running set is kept sorted descending and the candidates are sorted
ascending; their element-wise maximum holds the W largest keys of both as a bitonic sequence,
which the last stage of a bitonic network sorts again. The network is written with
reshape/split/join (no tl.sort), which also keeps Triton's CPU interpreter fast.

A tile's work grows with its position, so programs launch on one grid axis, the last tiles
(packed: the longest ones) first; at 64k on an H200 (16 heads, 2 selection heads, DK = 96)
that alone took the kernel from 1.21 to 0.80 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..compressed_attention.triton_op import (
    LOG2E,
    LOG2E_VALUE,
    SeqLayout,
    _ranked_program,
    _ranked_query_tile,
    compressed_lse,
)
from ..tiles import dot_parts, dot_precision, dot_rows, head_split, load_parts
from ..utils import softmax_scale


@dataclass(frozen=True)
class SelectConfig:
    """Tile sizes of the selection kernel; `default_select_config` picks them per device."""

    rows: int = 64  # query blocks per program (scored by their first query)
    min_width: int = 16  # smallest running top-n width (selection blocks per step)
    min_blocks: int = 16  # smallest number of query blocks per program (dot operand >= 16)
    head_tile: int = 256  # head dims up to this (padded) are read whole, wider in chunks
    head_chunk: int = 64
    num_warps: int = 8
    num_stages: int = 1


def default_select_config(device: torch.device, dtype: torch.dtype, dk: int) -> SelectConfig:
    """GPU dots need operands of at least 16; fewer rows for head dims over 128 and for
    full-precision fp32 dots (CUDA cores) keep sm_90's registers from spilling. Whole head
    dims (up to head_tile) are pipelined over three stages with four warps: at 64k on an H200
    (16 heads, 2 selection heads, the same selections) 4.16 -> 3.16 ms at DK = 96 and
    8.70 -> 7.06 ms at 192, against one stage and eight warps. The CPU interpreter prefers
    small tiles."""
    if device.type != "cuda":
        return SelectConfig(rows=32, min_width=1, min_blocks=1)
    if dtype == torch.float32:
        return SelectConfig(rows=16, num_warps=4)
    rows = 32 if dk > 128 else 64
    if triton.next_power_of_2(dk) > SelectConfig.head_tile:
        return SelectConfig(rows=rows)
    return SelectConfig(rows=rows, num_warps=4, num_stages=3)


@triton.jit
def _overlap(i, j, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr):
    """Overlap, in strides, of compression block i with selection block j (fp32)."""
    lo = tl.maximum(i * CMP_STRIDE, j * SEL_BLOCK)
    hi = tl.minimum(i * CMP_STRIDE + CMP_BLOCK, (j + 1) * SEL_BLOCK)
    return (tl.maximum(hi - lo, 0) // CMP_STRIDE).to(tl.float32)


@triton.jit
def _bitonic_step(
    x, M: tl.constexpr, LOG_W: tl.constexpr, STAGE: tl.constexpr, J: tl.constexpr,
    DESCENDING: tl.constexpr,
):
    """One compare-exchange step of Batcher's bitonic network on the rows of x [M, 2**LOG_W]:
    element i meets i ^ 2**J and, within runs of 2**STAGE, the run's direction is kept
    (alternating, then uniform at STAGE = LOG_W). Partners are taken apart with tl.split."""
    y = tl.reshape(x, [M, (1 << LOG_W) >> (J + 1), 2, 1 << J])
    left, right = tl.split(tl.permute(y, [0, 1, 3, 2]))  # [M, A, 2**J] each
    run = tl.arange(0, (1 << LOG_W) >> (J + 1)) >> (STAGE - J - 1)
    ascending = ((run & 1) == DESCENDING)[None, :, None]
    low, high = tl.minimum(left, right), tl.maximum(left, right)
    y = tl.join(tl.where(ascending, low, high), tl.where(ascending, high, low))
    return tl.reshape(tl.permute(y, [0, 1, 3, 2]), [M, 1 << LOG_W])


@triton.jit
def _sort_rows(x, M: tl.constexpr, LOG_W: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort each row of x [M, 2**LOG_W]; DESCENDING is 0 or 1."""
    for stage in tl.static_range(1, LOG_W + 1):
        for step in tl.static_range(stage):
            x = _bitonic_step(x, M, LOG_W, stage, stage - 1 - step, DESCENDING)
    return x


@triton.jit
def _merge_rows(x, M: tl.constexpr, LOG_W: tl.constexpr, DESCENDING: tl.constexpr):
    """Sort each row of a bitonic x [M, 2**LOG_W] (the last stage of the network only)."""
    for step in tl.static_range(LOG_W):
        x = _bitonic_step(x, M, LOG_W, LOG_W, LOG_W - 1 - step, DESCENDING)
    return x


@triton.jit
def _select_kernel(
    q, k, lse, out, tiles, cu_seqlens, cu_cmp,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_lb, stride_lt, stride_lh,
    stride_ob, stride_ot, stride_oh, stride_on,
    seq_len, num_cmp, num_tiles, num_bg, q_offset, scale_log2,
    HI: tl.constexpr, GROUP_KV: tl.constexpr, GROUP_SEL: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    STRIDES: tl.constexpr, TOP_N: tl.constexpr,
    QUERY_BLOCK: tl.constexpr, QUERY_BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, LOG_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DK: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, DK1: tl.constexpr,
    DK2: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Top-n selection blocks of BLOCK_M query blocks for one selection group.

    STRIDES = l' / s: compressed blocks that start inside one selection block. Rows index
    queries inside the sequence; rules see them at positions q_offset + row (unpacked only).
    """
    rank, pid_bg, _ = _ranked_program(num_bg, 1)
    b = (pid_bg // HI).to(tl.int64)
    group = pid_bg % HI
    # The last tiles, with the most selection blocks to score, first.
    tile, bos, length, cbos, n_cmp = _ranked_query_tile(
        rank, tiles, cu_seqlens, cu_cmp, num_tiles, seq_len, num_cmp, PACKED
    )

    # Rows: the first query of each of the BLOCK_M query blocks.
    first_t = (tile * BLOCK_M + tl.arange(0, BLOCK_M)) * QUERY_BLOCK  # [BM] positions
    block_ok = first_t < length
    q_rows = (bos + first_t).to(tl.int64) * stride_qt
    l_rows = (bos + first_t).to(tl.int64) * stride_lt
    current = (q_offset + first_t) // SEL_BLOCK  # [BM] the selection block holding the queries
    last_t = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) * QUERY_BLOCK, length - 1)
    n_sel = (q_offset + last_t) // SEL_BLOCK + 1  # selection blocks any row may pick

    offs_c = tl.arange(0, BLOCK_C)
    offs_w = tl.arange(0, WIDTH)
    top = tl.full([BLOCK_M, WIDTH], -1, dtype=tl.int64)  # running keys, sorted descending
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)  # spill into the next step's first block
    for j0 in range(0, n_sel, WIDTH):
        i = j0 * STRIDES + offs_c  # compressed blocks starting in selection blocks j0..j0+W
        i_ok = (offs_c < WIDTH * STRIDES) & (i < n_cmp)
        visible = i[None, :] * CMP_STRIDE + CMP_BLOCK - 1 <= q_offset + first_t[:, None]
        visible = visible & i_ok[None, :] & block_ok[:, None]  # [BM, BC]
        k_rows = (cbos + i).to(tl.int64) * stride_kn
        probs = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for g in range(GROUP_SEL):
            h = (group * GROUP_SEL + g).to(tl.int64)
            q_base = q + b * stride_qb + h * stride_qh
            k_base = k + b * stride_kb + (h // GROUP_KV) * stride_kh
            if NUM_DK == 1:  # a whole DK in its two parts DK1 + DK2
                q1, q2 = load_parts(q_base, q_rows, block_ok, 0, DK, stride_qd, DK1, DK2)
                k1, k2 = load_parts(k_base, k_rows, i_ok, 0, DK, stride_kd, DK1, DK2)
                s = dot_parts(q1, q2, k1, k2, DK2, PRECISION)  # [BM, BC]
            else:
                s = dot_rows(
                    q_base, q_rows, block_ok, stride_qd, k_base, k_rows, i_ok, stride_kd,
                    DK, BLOCK_DK, NUM_DK, BLOCK_M, BLOCK_C, PRECISION,
                )
            lse_t = tl.load(
                lse + b * stride_lb + l_rows + h * stride_lh, mask=block_ok, other=0.0
            )
            lse_t = tl.where(lse_t == float("-inf"), 0.0, lse_t * LOG2E)
            probs += tl.where(visible, tl.exp2(s * scale_log2 - lse_t[:, None]), 0.0)

        j = j0 + offs_w  # [W] selection blocks of this step
        weight = _overlap(i[:, None], j[None, :], CMP_BLOCK, CMP_STRIDE, SEL_BLOCK)  # [BC, W]
        score = tl.dot(probs, weight, input_precision="ieee")  # [BM, W]
        score += tl.where(offs_w[None, :] == 0, carry[:, None], 0.0)
        spill = _overlap(i, j0 + WIDTH, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK)  # [BC]
        carry = tl.sum(probs * spill[None, :], axis=1)

        causal = (j[None, :] <= current[:, None]) & block_ok[:, None]
        forced = (j[None, :] == 0) | (j[None, :] == current[:, None])
        forced = forced | (j[None, :] == current[:, None] - 1)
        bits = tl.where(score > 0, score.to(tl.int32, bitcast=True), 0)  # +0.0 for -0.0
        bits = tl.where(forced, 0x7F800000, bits).to(tl.int64)  # forced blocks score +inf
        key = tl.where(causal, ((bits + 1) << 32) | j[None, :].to(tl.int64), -1)
        # top is sorted descending, the candidates ascending: their element-wise maximum is
        # a bitonic sequence holding the W largest keys of both.
        top = _merge_rows(tl.maximum(top, _sort_rows(key, BLOCK_M, LOG_W, 0)), BLOCK_M, LOG_W, 1)

    big = 0x7FFFFFFF
    chosen = tl.where(top >= 0, (top & 0xFFFFFFFF).to(tl.int32), big)
    chosen = tl.where(offs_w[None, :] < TOP_N, chosen, big)
    chosen = _sort_rows(chosen, BLOCK_M, LOG_W, 0)  # ascending; unused slots last
    chosen = tl.where(chosen == big, -1, chosen)  # [BM, W]

    # Every query of a query block gets the block's selection.
    members = tl.arange(0, QUERY_BLOCK_P)
    t3 = first_t[:, None, None] + members[None, :, None]  # [BM, QP, 1]
    o_ptr = (
        out + b * stride_ob + group.to(tl.int64) * stride_oh
        + (bos + t3).to(tl.int64) * stride_ot + offs_w[None, None, :] * stride_on
    )
    mask = (members[None, :, None] < QUERY_BLOCK) & (t3 < length)
    mask = mask & (offs_w[None, None, :] < TOP_N)
    tl.store(o_ptr, tl.broadcast_to(chosen[:, None, :], [BLOCK_M, QUERY_BLOCK_P, WIDTH]), mask=mask)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    select_block_size: int,
    top_n: int,
    num_selection_heads: int | None = None,
    selection_query_block: int = 1,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: SelectConfig | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Same contract as `reference.select_blocks`, on the Triton kernel.

    q [B, T, HQ, DK], k_cmp [B, N, HK, DK] -> int32 [B, T, HI, n], ascending, -1 padded.
    `lse` [B, T, HQ] is compressed attention's log-sum-exp at the same scale; without it a
    first pass computes it. `config` overrides the tile sizes.
    """
    batch, seqlen, heads, dk = q.shape
    kv_heads = k_cmp.shape[2]
    groups = num_selection_heads or kv_heads
    scale = softmax_scale(scale, dk)
    cfg = config or default_select_config(q.device, q.dtype, dk)
    if lse is None:
        lse = compressed_lse(q, k_cmp, block_size, stride, scale, cu_seqlens, q_offset=q_offset)
    lse = lse.detach().float()
    out = torch.empty(batch, seqlen, groups, top_n, dtype=torch.int32, device=q.device)

    qb = selection_query_block
    block_m = max(cfg.min_blocks, cfg.rows)
    width = max(cfg.min_width, triton.next_power_of_2(top_n))
    layout = SeqLayout.build(seqlen, block_size, stride, cu_seqlens)
    tiles, n_tiles = layout.tiles(block_m * qb, q.device)
    if n_tiles == 0:
        return out
    ksplit = head_split(dk, cfg.head_tile, cfg.head_chunk)
    _select_kernel[(n_tiles * batch * groups,)](
        q, k_cmp, lse, out, tiles, layout.cu_seqlens, layout.cu_cmp,
        *q.stride(), *k_cmp.stride(), *lse.stride(), *out.stride(),
        seqlen, k_cmp.shape[1], n_tiles, batch * groups, q_offset, scale * LOG2E_VALUE,
        HI=groups, GROUP_KV=heads // kv_heads, GROUP_SEL=heads // groups,
        CMP_BLOCK=block_size, CMP_STRIDE=stride, SEL_BLOCK=select_block_size,
        STRIDES=select_block_size // stride, TOP_N=top_n,
        QUERY_BLOCK=qb, QUERY_BLOCK_P=triton.next_power_of_2(qb),
        BLOCK_M=block_m, WIDTH=width, LOG_W=width.bit_length() - 1,
        BLOCK_C=max(16, triton.next_power_of_2(width * (select_block_size // stride))),
        DK=dk, BLOCK_DK=ksplit.block, NUM_DK=ksplit.chunks, DK1=ksplit.parts[0],
        DK2=ksplit.parts[1],
        PACKED=layout.packed, PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
