"""Token compression (mean pooling or the learnable MLP compressor).

Both are dense tensor programs (unfold + matmul), so they run through PyTorch on every
device; there is no separate kernel.
"""

from __future__ import annotations

import torch

from ..utils import check_blocks, check_cu_seqlens, compressed_cu_seqlens, num_compressed_blocks
from . import reference


def _check_x(x: torch.Tensor, block_size: int, stride: int, cu_seqlens: torch.Tensor | None):
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, D], got shape {tuple(x.shape)}")
    check_blocks(block_size, stride)
    check_cu_seqlens(cu_seqlens, x)


def compress_mean(
    x: torch.Tensor,
    block_size: int,
    stride: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of every complete block [i*s, i*s + l): x [B, T, H, D] -> [B, N, H, D]."""
    _check_x(x, block_size, stride, cu_seqlens)
    return reference.compress_mean(x, block_size, stride, cu_seqlens)


def compress_mlp(
    x: torch.Tensor,
    pos_emb: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    block_size: int,
    stride: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head MLP over each flattened block plus a position embedding (NSA Eq. 7).

    x [B, T, H, D], pos_emb [H, l, D], w1 [H, l*D, F], b1 [H, F], w2 [H, F, D],
    b2 [H, D] -> [B, N, H, D].
    """
    _check_x(x, block_size, stride, cu_seqlens)
    heads, dim = x.shape[2], x.shape[3]
    expected = {
        "pos_emb": (heads, block_size, dim),
        "w1": (heads, block_size * dim, w1.shape[-1]),
        "b1": (heads, w1.shape[-1]),
        "w2": (heads, w1.shape[-1], dim),
        "b2": (heads, dim),
    }
    for name, tensor in zip(expected, (pos_emb, w1, b1, w2, b2), strict=True):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} for x {tuple(x.shape)} and "
                f"block_size={block_size}, got {tuple(tensor.shape)}"
            )
    return reference.compress_mlp(x, pos_emb, w1, b1, w2, b2, block_size, stride, cu_seqlens)


__all__ = ["compress_mean", "compress_mlp", "compressed_cu_seqlens", "num_compressed_blocks"]
