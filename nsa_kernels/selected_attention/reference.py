"""Attention over the selected blocks (NSA's selection branch).

Query head h reads the blocks chosen for its selection head h // (HQ / HI); inside the
chosen blocks attention stays causal (key j <= t). Index -1 means "no block". With `q_offset`
o the T queries are the last T of o + T keys: query i sits at t = o + i.
"""

from __future__ import annotations

import torch

from ..utils import masked_attention, per_document, softmax_scale


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    select_block_size: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """q [B, T, HQ, DK], k [B, o + T, HK, DK], v [B, o + T, HK, DV], block_indices
    [B, T, HI, n] -> o [B, T, HQ, DV]."""
    scale = softmax_scale(scale, q.shape[-1])
    if cu_seqlens is not None:
        return per_document(
            lambda q_, k_, v_, i_: selected_attention(q_, k_, v_, i_, select_block_size, scale),
            [cu_seqlens] * 4,
            [q, k, v, block_indices],
        )
    batch, seqlen, heads, _ = q.shape
    groups = block_indices.shape[2]
    num_keys = k.shape[1]
    num_slc = -(-num_keys // select_block_size)
    idx = torch.where(block_indices >= 0, block_indices, num_slc).long()
    chosen = torch.zeros(batch, seqlen, groups, num_slc + 1, dtype=torch.bool, device=q.device)
    chosen = chosen.scatter(-1, idx, True)[..., :num_slc]  # [B, T, HI, M]
    key = torch.arange(num_keys, device=q.device)
    query = q_offset + torch.arange(seqlen, device=q.device)
    allowed = chosen[..., key // select_block_size]  # [B, T, HI, S]
    mask = allowed & (key[None, :] <= query[:, None])[None, :, None, :]
    mask = mask.transpose(1, 2).repeat_interleave(heads // groups, dim=1)  # [B, HQ, T, S]
    return masked_attention(q, k, v, mask, scale)[0]
