"""Compressors phi: one token per block [i*s, i*s + l) of (latent) keys, per head.

`MLPCompressor` is NSA's learnable compressor (Eq. 7): an MLP over the flattened block plus
an intra-block position embedding, one MLP per head. `MeanCompressor` averages the block.
Both take [b, t, heads, dim] tokens (heads of this TP rank) and return [b, n, heads, dim].
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

import nsa_kernels

from ..parallel import HeadPartition, init_partitioned_, mark_partitioned, param_device
from .linear import partitioned_state_dict


class MLPCompressor(MegatronModule):
    """phi(block) = W2 silu(W1 flatten(block + pos_emb) + b1) + b2, per head.

    Parameters, this rank's heads first on axis 0: pos_emb [h, l, D], w1 [h, l*D, F],
    b1 [h, F], w2 [h, F, D], b2 [h, D] with F = config.compress_mlp_hidden_size or D.
    """

    def __init__(self, config: TransformerConfig, head_dim: int, partition: HeadPartition):
        super().__init__(config=config)
        self.partition = partition
        self.block_size, self.stride = config.compress_block_size, config.compress_stride
        heads, l, dim = partition.local_heads, self.block_size, head_dim
        hidden = config.compress_mlp_hidden_size or head_dim
        device, dtype = param_device(config), config.params_dtype

        def param(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.zeros(heads, *shape, device=device, dtype=dtype))

        self.pos_emb, self.w1, self.b1 = param(l, dim), param(l * dim, hidden), param(hidden)
        self.w2, self.b2 = param(hidden, dim), param(dim)
        if config.perform_initialization:
            init_partitioned_(self.w1, config.init_method, partition)
            init_partitioned_(self.w2, config.output_layer_init_method, partition)
        for p in self.parameters():
            mark_partitioned(p, partition)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return nsa_kernels.compress_mlp(
            x, self.pos_emb, self.w1, self.b1, self.w2, self.b2,
            self.block_size, self.stride, cu_seqlens=cu_seqlens,
        )

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return partitioned_state_dict(self, prefix, sharded_offsets, metadata)


class MeanCompressor(MegatronModule):
    """Mean of each block; no parameters."""

    def __init__(self, config: TransformerConfig, head_dim: int, partition: HeadPartition):
        super().__init__(config=config)
        self.block_size, self.stride = config.compress_block_size, config.compress_stride

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return nsa_kernels.compress_mean(x, self.block_size, self.stride, cu_seqlens=cu_seqlens)
