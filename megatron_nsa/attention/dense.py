"""Dense ("D") layers: full causal attention with GQA and RoPE, the baseline.

Also holds the GQA query/key/value projection that the classic NSA layers share. Under
context parallelism both kinds all-gather the per-KV-head keys and values over the CP group
(as Llama 3 does) and attend for this rank's chunks at their offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec
from torch.nn.attention.bias import causal_lower_right

from ..config import ASATransformerConfig
from ..context_parallel import (
    ContextParallelLayout,
    PendingGather,
    QueryPiece,
    run_pieces,
    start_gather,
)
from .base import (
    ASACoreAttention,
    ASASelfAttention,
    ASASelfAttentionSubmodules,
    TokenLayout,
    packed_cu_seqlens,
)
from .fusion import rotate
from .rope import Rotary, default_softmax_scale


@dataclass
class DenseSelfAttentionSubmodules(ASASelfAttentionSubmodules):
    """Submodules of `DenseSelfAttention` (core attention: `DenseCoreAttention`)."""

    linear_qkv: ModuleSpec | type | None = None
    """Column-parallel GQA projection (see GQAProjectionMixin)."""


class GQAProjectionMixin:
    """linear_qkv: column-parallel hidden -> (H + 2 G) * d, grouped per KV head as
    [H/G query heads, key, value] so that a TP split keeps groups whole."""

    def build_gqa(self: ASASelfAttention, submodules: DenseSelfAttentionSubmodules) -> None:
        """linear_qkv, the core attention on [d] heads, and the output projection."""
        self.build_qkv(submodules.linear_qkv)
        self.core_attention = self.build_core_attention(
            submodules.core_attention,
            default_softmax_scale(self.config, self.head_dim),
            self.head_dim,
            self.head_dim,
        )
        self.build_output_projection(
            submodules.linear_proj, self.config.num_attention_heads * self.head_dim
        )

    def build_qkv(self: ASASelfAttention, spec: ModuleSpec | type) -> None:
        config = self.config
        self.head_dim = config.kv_channels
        self.num_groups = config.num_query_groups
        tp_size = self.tp_group.size()
        if self.num_groups % tp_size:
            raise ValueError(
                f"num_query_groups={self.num_groups} must be a multiple of the tensor parallel "
                f"size {tp_size}"
            )
        self.local_groups = self.num_groups // tp_size
        heads = config.num_attention_heads
        self.linear_qkv = self.column_parallel(
            spec, config.hidden_size, (heads + 2 * self.num_groups) * self.head_dim, "qkv"
        )
        rotary_dim = int(self.head_dim * config.rotary_percent)
        self.rotary = Rotary(config, rotary_dim, self.pg_collection.cp)

    def qkv(
        self: ASASelfAttention, hidden_states: torch.Tensor, tokens: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [s(/TP), b, h] -> q [s, b, H_local, d], k, v [s, b, G_local, d]."""
        qkv, _ = self.linear_qkv(hidden_states)
        per_group = self.heads.local_heads // self.local_groups
        qkv = qkv.view(*qkv.shape[:2], self.local_groups, per_group + 2, self.head_dim)
        q, k, v = qkv.split([per_group, 1, 1], dim=3)
        q = q.reshape(*q.shape[:2], -1, self.head_dim)
        cos, sin = self.rotary.cos_sin(tokens.positions, tokens.length)
        fuse = self.config.fuse_elementwise
        q, k = rotate(q, cos, sin, fuse=fuse), rotate(k.squeeze(3), cos, sin, fuse=fuse)
        return q, k, v.squeeze(3)

    def start_kv_gather(
        self: ASASelfAttention, key: torch.Tensor, value: torch.Tensor, cp: ContextParallelLayout
    ) -> PendingGather:
        """Start all-gathering key and value [s, b, G_local, d] over the CP group."""
        return start_gather(
            torch.cat((key, value), dim=-1), cp, self.cp_group, self.layer_number, "kv"
        )

    @staticmethod
    def gathered_kv(pending: PendingGather) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value [S, b, G_local, d] of the whole sequence, in global order."""
        key, value = pending.wait().chunk(2, dim=-1)
        return key, value


class DenseSelfAttention(GQAProjectionMixin, ASASelfAttention):
    """Full causal GQA attention with RoPE; [s(/TP), b, h] -> ([s(/TP), b, h], bias)."""

    def __init__(
        self,
        config: ASATransformerConfig,
        submodules: DenseSelfAttentionSubmodules,
        layer_number: int,
        **kwargs,
    ) -> None:
        """kwargs: Megatron's attention arguments (attn_mask_type, pg_collection, ...)."""
        super().__init__(config, layer_number, **kwargs)
        self.build_gqa(submodules)

    def attend(
        self,
        hidden_states: torch.Tensor,
        tokens: TokenLayout,
        packed_seq_params: PackedSeqParams | None,
    ) -> torch.Tensor:
        query, key, value = self.qkv(hidden_states, tokens)
        if tokens.cp is None:
            return self.run_core(query, key, value, packed_seq_params)
        key, value = self.gathered_kv(self.start_kv_gather(key, value, tokens.cp))
        return self.run_core(
            query, key, value, packed_seq_params, pieces=tokens.cp.causal_pieces()
        )


class DenseCoreAttention(ASACoreAttention):
    """Causal softmax attention through torch's scaled_dot_product_attention."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        pieces: list[QueryPiece] | None = None,
    ) -> torch.Tensor:
        """query [s, b, H, d], key, value [S, b, G, d] -> [s, b, H * d]; S = s, or the whole
        sequence under context parallelism, read by the query `pieces`."""
        heads = query.shape[2]
        # [s, b, heads, d] -> [b, heads, s, d], with KV heads repeated for their query groups.
        q = query.permute(1, 2, 0, 3)
        k = key.repeat_interleave(heads // key.shape[2], dim=2).permute(1, 2, 0, 3)
        v = value.repeat_interleave(heads // value.shape[2], dim=2).permute(1, 2, 0, 3)
        cu_seqlens = packed_cu_seqlens(packed_seq_params)
        if pieces is not None:
            out = torch.cat(
                run_pieces(pieces, self.causal, queries=(q,), keys=(k, v), dim=2), dim=2
            )
        elif cu_seqlens is None:
            out = self.causal(q, k, v)
        else:
            bounds = cu_seqlens.tolist()
            out = torch.cat(
                [
                    self.causal(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                    for a, b in zip(bounds[:-1], bounds[1:], strict=True)
                    if b > a
                ],
                dim=2,
            )
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    def causal(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0
    ) -> torch.Tensor:
        """q [b, H, t, d] at positions q_offset + i of k, v [b, H, q_offset + t, d]: causal
        aligned to the last key (no mask tensor, so SDPA keeps its flash kernels)."""
        if q_offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        mask = causal_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
