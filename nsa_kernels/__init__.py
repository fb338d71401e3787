"""nsa_kernels: the attention ops of Alternating Sparse Attention on [B, T, H, D] tensors.

Every op takes `backend="auto" | "triton" | "reference"` (auto = Triton on CUDA tensors,
the plain-PyTorch reference otherwise) and optional `cu_seqlens` for packed sequences.
`nsa_kernels.reference` holds the plain-PyTorch versions. Imports torch and triton only.
"""

from .compressed_attention import compressed_attention
from .compression import compress_mean, compress_mlp, compressed_cu_seqlens, num_compressed_blocks
from .nsa import nsa_attention
from .selected_attention import selected_attention
from .selection import select_blocks
from .window import sliding_window_attention

__all__ = [
    "compress_mean",
    "compress_mlp",
    "compressed_attention",
    "compressed_cu_seqlens",
    "nsa_attention",
    "num_compressed_blocks",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
]
