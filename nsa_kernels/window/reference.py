"""Sliding-window causal attention, the local (MLA) layer's only branch.

Query t attends to keys j with t - w < j <= t. K and V head dims may differ (MLA:
d_h + d_R for keys, d_v for values) and KV heads may be shared by groups of query heads.
With `q_offset` o the T queries are the last T of o + T keys: query i sits at position o + i.
"""

from __future__ import annotations

import torch

from ..utils import masked_attention, per_document, softmax_scale


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """q [B, T, HQ, DK], k [B, o + T, HK, DK], v [B, o + T, HK, DV] -> o [B, T, HQ, DV]."""
    scale = softmax_scale(scale, q.shape[-1])
    if cu_seqlens is not None:
        return per_document(
            lambda q_, k_, v_: sliding_window_attention(q_, k_, v_, window_size, scale),
            [cu_seqlens] * 3,
            [q, k, v],
        )
    query = q_offset + torch.arange(q.shape[1], device=q.device)[:, None]
    key = torch.arange(k.shape[1], device=q.device)[None, :]
    mask = (key <= query) & (key > query - window_size)  # [T, o + T]
    return masked_attention(q, k, v, mask, scale)[0]
