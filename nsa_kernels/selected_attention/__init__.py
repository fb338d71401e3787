"""Selected-block attention: public op with backend dispatch."""

from __future__ import annotations

import torch

from ..utils import check_cu_seqlens, check_positive, check_q_offset, check_qkv, use_triton
from . import reference


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    select_block_size: int,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int = 0,
    selection_query_block: int = 1,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention restricted to the chosen blocks of size l'.

    q [B, T, HQ, DK], k [B, o + T, HK, DK], v [B, o + T, HK, DV], block_indices
    [B, T, HI, n] (unique per row, -1 = none; document-relative with cu_seqlens) ->
    o [B, T, HQ, DV]. With `q_offset` o > 0 the queries are the last T of the keys.
    `selection_query_block` says how many consecutive queries share one selection (as
    `select_blocks` made them); it only sizes the kernels' query tiles, never the result.
    `deterministic` keeps the Triton backend off fp32 atomics (bitwise repeatable results,
    slower for small head groups; Megatron's `deterministic_mode`).
    """
    check_qkv(q, k, v, same_length=False)
    check_positive("select_block_size", select_block_size)
    check_positive("selection_query_block", selection_query_block)
    check_cu_seqlens(cu_seqlens, q)
    check_q_offset(q_offset, cu_seqlens, q.shape[1], k.shape[1])
    if block_indices.dim() != 4 or block_indices.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"block_indices must be [B, T, HI, n] matching q {tuple(q.shape)}, "
            f"got {tuple(block_indices.shape)}"
        )
    if q.shape[2] % block_indices.shape[2]:
        raise ValueError(
            f"selection heads ({block_indices.shape[2]}) must divide query heads ({q.shape[2]})"
        )
    if block_indices.is_floating_point():
        raise ValueError(f"block_indices must be an integer tensor, got {block_indices.dtype}")
    if use_triton(backend, q, k, v):
        # Imported on use: Triton decides at definition time whether kernels are interpreted.
        from . import triton_op

        return triton_op.selected_attention(
            q, k, v, block_indices, select_block_size, scale, cu_seqlens, q_offset=q_offset,
            selection_query_block=selection_query_block, deterministic=deterministic,
        )
    return reference.selected_attention(
        q, k, v, block_indices, select_block_size, scale, cu_seqlens, q_offset
    )
