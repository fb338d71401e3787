"""The query of the latent layers (MLA local, GLA global): q_h = [W_UQ_h x ; RoPE(W_QR_h x)].

With `q_lora_rank` set the query is low-rank as in DeepSeek-V2 and Megatron's MLA:
x -> duplicated down-projection -> RMSNorm -> column-parallel up-projection.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import build_module

from .base import ASASelfAttention
from .rope import Rotary


class LatentQueryMixin:
    """Builds and applies linear_q_proj, or linear_q_down_proj + q_layernorm + linear_q_up_proj."""

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
        q_nope, q_rope = q.split([self.config.qk_head_dim, self.config.qk_pos_emb_head_dim], -1)
        return torch.cat((q_nope, Rotary.rotate(q_rope, cos, sin)), dim=-1)
