"""Compressed attention: public op with backend dispatch."""

from __future__ import annotations

import torch

from ..utils import (
    check_blocks,
    check_cu_seqlens,
    check_q_offset,
    check_qkv,
    compressed_cu_seqlens,
    num_compressed_blocks,
    use_triton,
)
from . import reference


def check_compressed(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    cu_seqlens: torch.Tensor | None,
    q_offset: int = 0,
) -> None:
    """k_cmp must hold exactly the complete blocks of every (packed) sequence: of the
    q_offset + T keys that end at the last query."""
    check_q_offset(q_offset, cu_seqlens, q.shape[1])
    if cu_seqlens is None:
        expected = num_compressed_blocks(q_offset + q.shape[1], block_size, stride)
    else:
        expected = int(compressed_cu_seqlens(cu_seqlens, block_size, stride)[-1])
    if k_cmp.shape[1] != expected:
        raise ValueError(
            f"k_cmp has {k_cmp.shape[1]} compressed tokens, but T={q.shape[1]} "
            f"(q_offset={q_offset}) with "
            f"block_size={block_size}, stride={stride} gives {expected}"
        )


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int = 0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over complete compressed blocks (block i visible when i*s + l - 1 <= t).

    q [B, T, HQ, DK], k_cmp [B, N, HK, DK], v_cmp [B, N, HK, DV] ->
    (o [B, T, HQ, DV], lse [B, T, HQ] float32, -inf where no block is visible).
    With `q_offset` o, query i sits at t = o + i and k_cmp holds the blocks of o + T tokens.
    """
    check_qkv(q, k_cmp, v_cmp, same_length=False)
    check_blocks(block_size, stride)
    check_cu_seqlens(cu_seqlens, q)
    check_compressed(q, k_cmp, block_size, stride, cu_seqlens, q_offset)
    if use_triton(backend, q, k_cmp, v_cmp):
        # Imported on use: Triton decides at definition time whether kernels are interpreted.
        from . import triton_op

        return triton_op.compressed_attention(
            q, k_cmp, v_cmp, block_size, stride, scale, cu_seqlens, q_offset=q_offset
        )
    return reference.compressed_attention(
        q, k_cmp, v_cmp, block_size, stride, scale, cu_seqlens, q_offset
    )
