"""Compression of (latent) tokens into one token per block (NSA Eq. 7).

Block i covers tokens [i*s, i*s + l); only complete blocks exist, so a sequence of T
tokens has max(0, (T - l) // s + 1) of them. Packed documents are compressed one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import compressed_cu_seqlens, per_document


def _blocks(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, N, H, l, D], the tokens of every complete block."""
    if x.shape[1] < block_size:
        return x.new_zeros(x.shape[0], 0, x.shape[2], block_size, x.shape[3])
    return x.unfold(1, block_size, stride).transpose(-1, -2)


def compress_mean(
    x: torch.Tensor,
    block_size: int,
    stride: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean pooling: x [B, T, H, D] -> [B, N, H, D]."""
    if cu_seqlens is not None:
        return per_document(
            lambda x_: compress_mean(x_, block_size, stride),
            [cu_seqlens],
            [x],
        )
    return _blocks(x, block_size, stride).mean(dim=3)


def compress_mlp(
    x: torch.Tensor,
    pos_emb: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    block_size: int,
    stride: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Learnable compressor phi, one MLP per head over the flattened block.

    x [B, T, H, D]; pos_emb [H, l, D] (intra-block position embedding); w1 [H, l*D, F],
    b1 [H, F], w2 [H, F, D], b2 [H, D]. Returns [B, N, H, D]:
    phi(block) = W2 silu(W1 flatten(block + pos_emb) + b1) + b2.
    """
    if cu_seqlens is not None:
        return per_document(
            lambda x_: compress_mlp(x_, pos_emb, w1, b1, w2, b2, block_size, stride),
            [cu_seqlens],
            [x],
        )
    blocks = _blocks(x, block_size, stride) + pos_emb  # [B, N, H, l, D]
    hidden = torch.einsum("bnhf,hfe->bnhe", blocks.flatten(-2), w1) + b1  # [B, N, H, F]
    return torch.einsum("bnhe,hed->bnhd", F.silu(hidden), w2) + b2  # [B, N, H, D]


__all__ = ["compress_mean", "compress_mlp", "compressed_cu_seqlens"]
