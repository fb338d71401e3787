"""Classic NSA ("N") layers, the baseline of the NSA paper: three gated branches over GQA K/V.

o = g_cmp o_cmp + g_slc o_slc + g_win o_win, where the compression branch attends to
per-KV-head compressed keys and values (one compressor for K, one for V, applied to
RoPE-rotated keys), the selection branch to the top-n blocks chosen by the compressed
scores (shared by the query heads of a KV head), and the window branch to the last
config.sliding_window_size tokens. [g_cmp, g_slc, g_win] = sigmoid(W_g x) per head.

Context parallelism: keys and values are all-gathered over the CP group (see dense.py), so
every branch, the window included, reads the whole sequence at each chunk's offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

import nsa_kernels

from ..config import ASATransformerConfig
from ..context_parallel import QueryPiece, run_pieces
from .base import ASACoreAttention, ASASelfAttention, TokenLayout, packed_cu_seqlens, tp_partition
from .dense import DenseSelfAttentionSubmodules, GQAProjectionMixin


@dataclass
class NSASelfAttentionSubmodules(DenseSelfAttentionSubmodules):
    """Submodules of `NSASelfAttention` (core attention: `NSACoreAttention`)."""

    linear_gate: ModuleSpec | type | None = None
    """Column-parallel hidden -> heads * 3, the three branch gates."""


class NSASelfAttention(GQAProjectionMixin, ASASelfAttention):
    """Classic NSA over GQA; [s(/TP), b, h] -> ([s(/TP), b, h], bias)."""

    def __init__(
        self,
        config: ASATransformerConfig,
        submodules: NSASelfAttentionSubmodules,
        layer_number: int,
        **kwargs,
    ) -> None:
        """kwargs: Megatron's attention arguments (attn_mask_type, pg_collection, ...)."""
        super().__init__(config, layer_number, **kwargs)
        self.build_gqa(submodules)
        self.linear_gate = self.column_parallel(
            submodules.linear_gate, config.hidden_size, config.num_attention_heads * 3, "gate",
            bias=True,
        )

    def attend(
        self,
        hidden_states: torch.Tensor,
        tokens: TokenLayout,
        packed_seq_params: PackedSeqParams | None,
    ) -> torch.Tensor:
        cp = tokens.cp
        query, key, value = self.qkv(hidden_states, tokens)
        if cp is not None:
            pending = self.start_kv_gather(key, value, cp)
        gates, _ = self.linear_gate(hidden_states)  # [s, b, H * 3]
        gates = torch.sigmoid(gates.float()).to(query.dtype).view(*query.shape[:3], 3)
        if cp is None:
            return self.run_core(query, key, value, packed_seq_params, gates=gates)
        key, value = self.gathered_kv(pending)
        blocks = (self.config.compress_block_size, self.config.compress_stride)
        return self.run_core(
            query, key, value, packed_seq_params, pieces=cp.causal_pieces(blocks), gates=gates
        )


@dataclass
class NSACoreAttentionSubmodules:
    """Submodules of `NSACoreAttention`."""

    compressor: ModuleSpec | type | None = None
    """Block compressor, built twice: for keys and for values (per KV head)."""


class NSACoreAttention(ASACoreAttention):
    """Compression + selection + sliding window over GQA K/V (nsa_kernels.nsa_attention)."""

    def __init__(self, *args, submodules: NSACoreAttentionSubmodules, **kwargs) -> None:
        """args, kwargs: Megatron's CoreAttention arguments (see ASACoreAttention)."""
        super().__init__(*args, **kwargs)
        config = self.config
        self.kv_heads = tp_partition(config.num_query_groups, self.tp_group, "num_query_groups")
        head_dim = self.k_channels
        self.compress_k = build_module(
            submodules.compressor, config=config, head_dim=head_dim, partition=self.kv_heads
        )
        self.compress_v = build_module(
            submodules.compressor, config=config, head_dim=head_dim, partition=self.kv_heads
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        gates: torch.Tensor | None = None,
        pieces: list[QueryPiece] | None = None,
    ) -> torch.Tensor:
        """query [s, b, H, d], key, value [S, b, G, d], gates [s, b, H, 3] -> [s, b, H * d];
        S = s, or the whole sequence under context parallelism, read by the query `pieces`."""
        cu_seqlens = packed_cu_seqlens(packed_seq_params)
        q, k, v, gates = self.to_batch_major(query, key, value, gates)
        k_cmp, v_cmp = self.compress_k(k, cu_seqlens), self.compress_v(v, cu_seqlens)
        if pieces is None:
            out = self.branches(q, gates, k, v, k_cmp, v_cmp, cu_seqlens=cu_seqlens)
        else:
            out = torch.cat(run_pieces(
                pieces, self.branches, queries=(q, gates), keys=(k, v), compressed=(k_cmp, v_cmp)
            ), dim=1)
        return self.to_sequence_major(out)

    def branches(
        self,
        q: torch.Tensor,
        gates: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cmp: torch.Tensor,
        v_cmp: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        q_offset: int = 0,
    ) -> torch.Tensor:
        """The three gated branches for queries q [b, t, H, d] at positions q_offset + i of
        k, v [b, q_offset + t, G, d] and their compressed blocks -> [b, t, H, d]."""
        config = self.config
        return nsa_kernels.nsa_attention(
            q, k, v, k_cmp, v_cmp, gates[..., 0], gates[..., 1],
            block_size=config.compress_block_size,
            stride=config.compress_stride,
            select_block_size=config.select_block_size,
            top_n=config.select_top_n,
            selection_query_block=config.selection_query_block,
            window_size=config.sliding_window_size,
            gate_window=gates[..., 2],
            scale=self.softmax_scale,
            cu_seqlens=cu_seqlens,
            q_offset=q_offset,
            deterministic=config.deterministic_mode,
            backend=self.backend,
        )
