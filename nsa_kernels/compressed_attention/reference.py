"""Attention over compressed tokens (NSA's compression branch).

Query t sees compressed block i only once the block is complete: i*s + l - 1 <= t.
Rows that see no block yet (t < l - 1) give output 0 and log-sum-exp -inf. With `q_offset` o,
query i sits at position t = o + i (a context-parallel chunk against the whole sequence's blocks).
"""

from __future__ import annotations

import torch

from ..utils import compressed_cu_seqlens, masked_attention, per_document, softmax_scale


def visible_blocks(
    num_queries: int,
    num_blocks: int,
    block_size: int,
    stride: int,
    device: torch.device,
    q_offset: int = 0,
) -> torch.Tensor:
    """Causal rule between queries (at positions o + i) and compressed blocks: [T, N] bool."""
    t = q_offset + torch.arange(num_queries, device=device)[:, None]
    i = torch.arange(num_blocks, device=device)[None, :]
    return i * stride + block_size - 1 <= t


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, HQ, DK], k_cmp [B, N, HK, DK], v_cmp [B, N, HK, DV] ->
    (o [B, T, HQ, DV], lse [B, T, HQ] float32)."""
    scale = softmax_scale(scale, q.shape[-1])
    if cu_seqlens is not None:
        cu_cmp = compressed_cu_seqlens(cu_seqlens, block_size, stride)
        return per_document(
            lambda q_, k_, v_: compressed_attention(q_, k_, v_, block_size, stride, scale),
            [cu_seqlens, cu_cmp, cu_cmp],
            [q, k_cmp, v_cmp],
        )
    mask = visible_blocks(q.shape[1], k_cmp.shape[1], block_size, stride, q.device, q_offset)
    return masked_attention(q, k_cmp, v_cmp, mask, scale)
