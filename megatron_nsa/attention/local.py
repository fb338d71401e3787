"""Local ("L") layers: DeepSeek-V2 multi-head latent attention over a sliding window.

c = RMSNorm(W_DKV x) in R^{d_c}; k^R = RoPE(W_KR x), shared by all heads;
k_h = [W_UK_h c ; k^R], v_h = W_UV_h c; q_h = [W_UQ_h x ; RoPE(W_QR_h x)];
query t attends to keys t - w < j <= t (w = config.sliding_window_size).

Tensor parallelism as in Megatron's MLA: query heads and the up-projections are column
parallel, the down-projection [W_DKV ; W_KR] is duplicated on every rank. c feeds a
column-parallel up-projection (whose backward sums c's gradient over TP); k^R feeds each
rank's heads directly, so `replicate_over_tp` sums its gradient.

Context parallelism: each of a rank's chunks needs the w - 1 tokens before it. The latent
tokens [c ; k^R] of those halos (d_c + d_R values per token, never per-head keys and values)
come point-to-point from the ranks that hold them, before the up-projection; each chunk then
attends to [halo ; chunk] with its queries at the offset of the halo's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import nsa_kernels
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ..config import ASATransformerConfig
from ..context_parallel import ContextParallelLayout, QueryPiece, with_halos
from ..parallel import replicate_over_tp
from .base import (
    ASACoreAttention,
    ASASelfAttention,
    TokenLayout,
    packed_cu_seqlens,
    query_chunks,
)
from .query import LatentQueryMixin
from .rope import Rotary, default_softmax_scale


@dataclass
class LocalSelfAttentionSubmodules:
    """Submodules of `LocalSelfAttention` (the fields of Megatron's MLA submodules)."""

    linear_q_proj: ModuleSpec | type | None = None
    """Column-parallel hidden -> heads * (d_h + d_R), used when q_lora_rank is None."""

    linear_q_down_proj: ModuleSpec | type | None = None
    """Duplicated hidden -> q_lora_rank, used when q_lora_rank is set."""

    linear_q_up_proj: ModuleSpec | type | None = None
    """Column-parallel q_lora_rank -> heads * (d_h + d_R)."""

    q_layernorm: ModuleSpec | type | None = None
    """Norm of the low-rank query."""

    linear_kv_down_proj: ModuleSpec | type | None = None
    """Duplicated hidden -> d_c + d_R: the latent c and the shared RoPE key k^R."""

    kv_layernorm: ModuleSpec | type | None = None
    """RMSNorm of the latent c."""

    linear_kv_up_proj: ModuleSpec | type | None = None
    """Column-parallel d_c -> heads * (d_h + d_v)."""

    core_attention: ModuleSpec | type | None = None
    """Sliding-window core attention."""

    linear_proj: ModuleSpec | type | None = None
    """Row-parallel heads * d_v -> hidden."""


class LocalSelfAttention(LatentQueryMixin, ASASelfAttention):
    """MLA with a sliding window; [s(/TP), b, h] -> ([s(/TP), b, h], bias)."""

    def __init__(
        self,
        config: ASATransformerConfig,
        submodules: LocalSelfAttentionSubmodules,
        layer_number: int,
        **kwargs,
    ) -> None:
        """kwargs: Megatron's attention arguments (attn_mask_type, pg_collection, ...)."""
        super().__init__(config, layer_number, **kwargs)
        self.build_query(submodules)
        d_c, d_r = config.kv_lora_rank, config.qk_pos_emb_head_dim
        self.linear_kv_down_proj = self.duplicated(
            submodules.linear_kv_down_proj, config.hidden_size, d_c + d_r
        )
        self.check_norm(submodules.kv_layernorm, "kv_layernorm")
        self.kv_layernorm = build_module(
            submodules.kv_layernorm, config=config, hidden_size=d_c, eps=config.layernorm_epsilon
        )
        self.linear_kv_up_proj = self.column_parallel(
            submodules.linear_kv_up_proj,
            d_c,
            config.num_attention_heads * (config.qk_head_dim + config.v_head_dim),
            "kv_up_proj",
        )
        self.rotary = Rotary(config, d_r, self.pg_collection.cp)
        self.core_attention = self.build_core_attention(
            submodules.core_attention,
            default_softmax_scale(config, self.q_head_dim),
            self.q_head_dim,
            config.v_head_dim,
        )
        self.build_output_projection(
            submodules.linear_proj, config.num_attention_heads * config.v_head_dim
        )

    def attend(
        self,
        hidden_states: torch.Tensor,
        tokens: TokenLayout,
        packed_seq_params: PackedSeqParams | None,
    ) -> torch.Tensor:
        config = self.config
        cos, sin = self.rotary.cos_sin(tokens.positions, tokens.length)
        latent, _ = self.linear_kv_down_proj(hidden_states)  # [s(/TP), b, d_c + d_R]
        c, k_rope = latent.split([config.kv_lora_rank, config.qk_pos_emb_head_dim], dim=-1)
        c = self.kv_layernorm(c)
        k_rope = replicate_over_tp(k_rope, self.tp_group, config.sequence_parallel)  # [s, b, d_R]
        key_cos, key_sin, pieces = cos, sin, None
        if tokens.cp is not None:
            c, k_rope, pieces = self.prepend_halos(c, k_rope, tokens.cp)  # keys [E, b, ...]
            halo = config.sliding_window_size - 1
            key_positions = tokens.cp.window_key_positions(halo, hidden_states.device)
            key_cos, key_sin = self.rotary.cos_sin(key_positions, tokens.length)
        # "mla_up_proj" recomputes the up-projections together with the core attention.
        whole = "mla_up_proj" in self.recompute_modules

        def up_project_and_attend(
            hidden_states: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor
        ) -> torch.Tensor:
            query = self.query(hidden_states, cos, sin)  # [s, b, H, d_h + d_R]
            kv, _ = self.linear_kv_up_proj(c)  # [E(+pad), b, H * (d_h + d_v)]
            keys = k_rope.shape[0]
            kv = kv[:keys].view(keys, kv.shape[1], self.heads.local_heads, -1)
            k_nope, value = kv.split([config.qk_head_dim, config.v_head_dim], dim=-1)
            k_rope = Rotary.rotate(k_rope.unsqueeze(2), key_cos, key_sin)
            key = torch.cat((k_nope, k_rope.expand(*k_nope.shape[:3], -1)), dim=-1)
            return self.run_core(
                query, key, value, packed_seq_params, checkpoint=not whole, pieces=pieces
            )

        return self.maybe_checkpoint(
            "mla_up_proj", up_project_and_attend, hidden_states, c, k_rope
        )

    def prepend_halos(
        self, c: torch.Tensor, k_rope: torch.Tensor, cp: ContextParallelLayout
    ) -> tuple[torch.Tensor, torch.Tensor, list[QueryPiece]]:
        """c [s(/TP), b, d_c], k_rope [s, b, d_R] -> the keys' latents with each chunk's halo
        in front, [E(/TP), b, d_c] and [E, b, d_R], and the query pieces over them.

        Under sequence parallelism c is gathered over TP for the exchange (its gradient then
        comes back whole on every TP rank, so the gather's backward keeps this rank's slice)
        and split again, zero-padded to a multiple of TP, for the up-projection, whose own
        gather and reduce-scatter stay as they are.
        """
        config = self.config
        halo = config.sliding_window_size - 1
        tp_size = self.tp_group.size()
        sequence_parallel = config.sequence_parallel and tp_size > 1
        if sequence_parallel:
            c = gather_from_sequence_parallel_region(
                c, tensor_parallel_output_grad=False, group=self.tp_group
            )
        latent = with_halos(
            torch.cat((c, k_rope), dim=-1), cp, halo, self.cp_group, self.layer_number
        )  # [E, b, d_c + d_R]
        c, k_rope = latent.split([config.kv_lora_rank, config.qk_pos_emb_head_dim], dim=-1)
        if sequence_parallel:
            c = F.pad(c, (0, 0, 0, 0, 0, -c.shape[0] % tp_size))
            c = scatter_to_sequence_parallel_region(c, group=self.tp_group)
        return c, k_rope, cp.window_pieces(halo)


class SlidingWindowCoreAttention(ASACoreAttention):
    """Causal attention over the last config.sliding_window_size keys (nsa_kernels)."""

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
        """query [s, b, heads, d_h + d_R], key [E, b, heads, d_h + d_R], value [E, b, heads, d_v]
        -> [s, b, heads * d_v]. E = s, or under context parallelism the chunks with their
        halos, as `pieces` describe."""
        q, k, v = self.to_batch_major(query, key, value)
        window = self.config.sliding_window_size
        if pieces is None:
            out = nsa_kernels.sliding_window_attention(
                q, k, v, window, scale=self.softmax_scale,
                cu_seqlens=packed_cu_seqlens(packed_seq_params), backend=self.backend,
            )
        else:
            out = query_chunks(
                q, pieces,
                lambda piece: nsa_kernels.sliding_window_attention(
                    q[:, piece.queries], k[:, piece.keys], v[:, piece.keys], window,
                    scale=self.softmax_scale, q_offset=piece.q_offset, backend=self.backend,
                ),
            )
        return self.to_sequence_major(out)
