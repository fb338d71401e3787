"""The query of the latent layers (MLA local, GLA global): q_h = [W_UQ_h x ; RoPE(W_QR_h x)].

With `q_lora_rank` set the query is low-rank as in DeepSeek-V2 and Megatron's MLA:
x -> duplicated down-projection -> RMSNorm -> column-parallel up-projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .base import ASASelfAttention, ASASelfAttentionSubmodules
from .fusion import rope_tail
from .rope import Rotary, default_softmax_scale


@dataclass
class LatentQuerySubmodules(ASASelfAttentionSubmodules):
    """The query projections of the latent layers (fields of Megatron's MLA submodules)."""

    linear_q_proj: ModuleSpec | type | None = None
    """Column-parallel hidden -> heads * (d_h + d_R), used when q_lora_rank is None."""

    linear_q_down_proj: ModuleSpec | type | None = None
    """Duplicated hidden -> q_lora_rank, used when q_lora_rank is set."""

    linear_q_up_proj: ModuleSpec | type | None = None
    """Column-parallel q_lora_rank -> heads * (d_h + d_R)."""

    q_layernorm: ModuleSpec | type | None = None
    """Norm of the low-rank query."""


class LatentQueryMixin:
    """Builds and applies linear_q_proj, or linear_q_down_proj + q_layernorm + linear_q_up_proj,
    and the parts both latent layer kinds share."""

    def build_query(self: ASASelfAttention, submodules) -> None:
        config = self.config
        self.q_head_dim = config.qk_head_dim + config.qk_pos_emb_head_dim
        out = config.num_attention_heads * self.q_head_dim
        if config.q_lora_rank is None:
            self.linear_q_proj = self.column_parallel(
                submodules.linear_q_proj, config.hidden_size, out, "q_proj"
            )
            return
        self.linear_q_down_proj = self.duplicated(
            submodules.linear_q_down_proj, config.hidden_size, config.q_lora_rank
        )
        self.check_norm(submodules.q_layernorm, "q_layernorm")
        self.q_layernorm = build_module(
            submodules.q_layernorm,
            config=config,
            hidden_size=config.q_lora_rank,
            eps=config.layernorm_epsilon,
        )
        self.linear_q_up_proj = self.column_parallel(
            submodules.linear_q_up_proj, config.q_lora_rank, out, "q_up_proj"
        )

    def build_rope_core_and_output(
        self: ASASelfAttention, submodules: LatentQuerySubmodules
    ) -> None:
        """RoPE of the shared key k^R, the core attention on [d_h + d_R] queries and keys and
        [d_v] values, and the output projection."""
        config = self.config
        self.rotary = Rotary(config, config.qk_pos_emb_head_dim, self.pg_collection.cp)
        self.core_attention = self.build_core_attention(
            submodules.core_attention,
            default_softmax_scale(config, self.q_head_dim),
            self.q_head_dim,
            config.v_head_dim,
        )
        self.build_output_projection(
            submodules.linear_proj, config.num_attention_heads * config.v_head_dim
        )

    def query(
        self: ASASelfAttention, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [s(/TP), b, h] -> q [s, b, heads_local, d_h + d_R], RoPE applied."""
        if self.config.q_lora_rank is None:
            q, _ = self.linear_q_proj(hidden_states)
        else:
            q_latent, _ = self.linear_q_down_proj(hidden_states)
            q, _ = self.linear_q_up_proj(self.q_layernorm(q_latent))
        q = q.view(*q.shape[:2], self.heads.local_heads, self.q_head_dim)
        return rope_tail(q, cos, sin, fuse=self.config.fuse_elementwise)
