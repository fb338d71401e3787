"""The plain-PyTorch reference of every op: readable, autograd, the oracle for the kernels."""

from __future__ import annotations

import torch

from .compressed_attention.reference import compressed_attention
from .compression.reference import compress_mean, compress_mlp
from .nsa import nsa_attention as _nsa_attention
from .selected_attention.reference import selected_attention
from .selection.reference import block_importance, select_blocks, selection_overlap
from .window.reference import sliding_window_attention


def nsa_attention(*args, **kwargs) -> torch.Tensor:
    """`nsa_kernels.nsa_attention` with every branch on the reference backend."""
    return _nsa_attention(*args, **kwargs, backend="reference")


__all__ = [
    "block_importance",
    "compress_mean",
    "compress_mlp",
    "compressed_attention",
    "nsa_attention",
    "select_blocks",
    "selected_attention",
    "selection_overlap",
    "sliding_window_attention",
]
