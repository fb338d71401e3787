"""Top-n block selection: public op with backend dispatch."""

from __future__ import annotations

import torch

from ..compressed_attention import check_compressed
from ..utils import check_blocks, check_cu_seqlens, check_positive, use_triton
from . import reference


def check_selection(
    heads: int,
    kv_heads: int,
    num_selection_heads: int | None,
    top_n: int,
    select_block_size: int,
    selection_query_block: int,
    q_offset: int = 0,
) -> None:
    check_positive("top_n", top_n)
    if top_n < 3:
        raise ValueError(
            f"top_n={top_n} must be >= 3: block 0 and the two most recent blocks are always kept"
        )
    check_positive("selection_query_block", selection_query_block)
    if select_block_size % selection_query_block:
        raise ValueError(
            f"selection_query_block={selection_query_block} must divide "
            f"select_block_size={select_block_size}"
        )
    if q_offset % selection_query_block:
        raise ValueError(
            f"q_offset={q_offset} must be a multiple of selection_query_block="
            f"{selection_query_block}: a query block must not straddle the offset"
        )
    groups = num_selection_heads or kv_heads
    check_positive("num_selection_heads", groups)
    if heads % groups:
        raise ValueError(f"num_selection_heads={groups} must divide the query heads ({heads})")


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    select_block_size: int,
    top_n: int,
    *,
    num_selection_heads: int | None = None,
    selection_query_block: int = 1,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    q_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Top-n selection blocks per query and selection head (NSA Eq. 8-11).

    q [B, T, HQ, DK], k_cmp [B, N, HK, DK] -> int32 [B, T, HI, n], ascending, -1 padded.
    HI = num_selection_heads (default HK): the query heads of one group share a selection.
    `lse` [B, T, HQ]: the log-sum-exp returned by `compressed_attention` with the same scale;
    the Triton backend then skips recomputing it (the reference ignores it). No gradient.
    With `q_offset` o, query i sits at position o + i and k_cmp holds the blocks of o + T
    tokens; o must be a multiple of `selection_query_block`.
    """
    if q.dim() != 4 or k_cmp.dim() != 4:
        raise ValueError(
            f"q and k_cmp must be [B, T, H, D], got {tuple(q.shape)} and {tuple(k_cmp.shape)}"
        )
    check_blocks(block_size, stride, select_block_size)
    check_selection(
        q.shape[2], k_cmp.shape[2], num_selection_heads, top_n, select_block_size,
        selection_query_block, q_offset,
    )
    check_cu_seqlens(cu_seqlens, q)
    check_compressed(q, k_cmp, block_size, stride, cu_seqlens, q_offset)
    if lse is not None and (lse.shape != q.shape[:3] or not lse.is_floating_point()):
        raise ValueError(
            f"lse must be a float tensor of shape [B, T, HQ] = {tuple(q.shape[:3])}, "
            f"got {lse.dtype} {tuple(lse.shape)}"
        )
    if use_triton(backend, q, k_cmp):
        # Imported on use: Triton decides at definition time whether kernels are interpreted.
        from . import triton_op

        return triton_op.select_blocks(
            q, k_cmp, block_size, stride, select_block_size, top_n, num_selection_heads,
            selection_query_block, scale, cu_seqlens, lse, q_offset=q_offset,
        )
    return reference.select_blocks(
        q, k_cmp, block_size, stride, select_block_size, top_n, num_selection_heads,
        selection_query_block, scale, cu_seqlens, lse, q_offset,
    )
