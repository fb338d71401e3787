"""Sliding-window attention: public op with backend dispatch."""

from __future__ import annotations

import torch

from ..utils import check_cu_seqlens, check_positive, check_q_offset, check_qkv, use_triton
from . import reference


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention over the last `window_size` keys (t - w < j <= t).

    q [B, T, HQ, DK], k [B, o + T, HK, DK], v [B, o + T, HK, DV] -> o [B, T, HQ, DV], where
    o = `q_offset`: query i sits at key position o + i (the queries are the last T of the
    keys), as for a context-parallel chunk with the tokens before it prepended to its keys.
    """
    check_qkv(q, k, v, same_length=False)
    check_positive("window_size", window_size)
    check_cu_seqlens(cu_seqlens, q)
    check_q_offset(q_offset, cu_seqlens, q.shape[1], k.shape[1])
    if use_triton(backend, q, k, v):
        # Imported on use: Triton decides at definition time whether kernels are interpreted.
        from . import triton_op

        return triton_op.sliding_window_attention(
            q, k, v, window_size, scale, cu_seqlens, q_offset
        )
    return reference.sliding_window_attention(q, k, v, window_size, scale, cu_seqlens, q_offset)
