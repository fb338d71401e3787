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
come point-to-point from the ranks that hold them, before the up-projection; the exchange
runs while the query is projected. Each chunk then attends to [halo ; chunk] with its
queries at the offset of the halo's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

import nsa_kernels

from ..config import ASATransformerConfig
from ..context_parallel import (
    ContextParallelLayout,
    PendingHalos,
    QueryPiece,
    run_pieces,
    start_halos,
)
from ..parallel import replicate_over_tp
from .base import ASACoreAttention, ASASelfAttention, TokenLayout, packed_cu_seqlens
from .fusion import rope_kv
from .query import LatentQueryMixin, LatentQuerySubmodules


@dataclass
class LocalSelfAttentionSubmodules(LatentQuerySubmodules):
    """Submodules of `LocalSelfAttention` (the fields of Megatron's MLA submodules); the
    core attention is `SlidingWindowCoreAttention`."""

    linear_kv_down_proj: ModuleSpec | type | None = None
    """Duplicated hidden -> d_c + d_R: the latent c and the shared RoPE key k^R."""

    kv_layernorm: ModuleSpec | type | None = None
    """RMSNorm of the latent c."""

    linear_kv_up_proj: ModuleSpec | type | None = None
    """Column-parallel d_c -> heads * (d_h + d_v)."""


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
        self.build_rope_core_and_output(submodules)

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
        key_cos, key_sin, pieces, halos = cos, sin, None, None
        if tokens.cp is not None:
            halos = self.start_halos(c, k_rope, tokens.cp)
            halo = config.sliding_window_size - 1
            key_positions = tokens.cp.window_key_positions(halo, hidden_states.device)
            key_cos, key_sin = self.rotary.cos_sin(key_positions, tokens.length)
            pieces = tokens.cp.window_pieces(halo)
        # "mla_up_proj" recomputes the query and up-projections with the core attention.
        whole = self.recomputes("mla_up_proj")

        def up_project_and_attend(
            query: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor
        ) -> torch.Tensor:
            kv, _ = self.linear_kv_up_proj(c)  # [E(+pad), b, H * (d_h + d_v)]
            keys = k_rope.shape[0]
            if kv.shape[0] != keys:  # the sequence-parallel padding
                kv = kv[:keys]
            key, value = rope_kv(
                kv.view(keys, kv.shape[1], self.heads.local_heads, -1), k_rope.unsqueeze(2),
                key_cos, key_sin, config.qk_head_dim, fuse=config.fuse_elementwise,
            )
            return self.run_core(
                query, key, value, packed_seq_params, checkpoint=not whole, pieces=pieces
            )

        if whole:
            if halos is not None:
                c, k_rope = self.finish_halos(halos)  # keys [E, b, ...]
            return self.maybe_checkpoint(
                "mla_up_proj",
                lambda hidden, c, k_rope: up_project_and_attend(
                    self.query(hidden, cos, sin), c, k_rope
                ),
                hidden_states, c, k_rope,
            )
        query = self.query(hidden_states, cos, sin)  # [s, b, H, d_h + d_R]; overlaps the halos
        if halos is not None:
            c, k_rope = self.finish_halos(halos)  # keys [E, b, ...]
        return up_project_and_attend(query, c, k_rope)

    def start_halos(
        self, c: torch.Tensor, k_rope: torch.Tensor, cp: ContextParallelLayout
    ) -> PendingHalos:
        """Start fetching the halos of c [s(/TP), b, d_c] and k_rope [s, b, d_R].

        Under sequence parallelism c is gathered over TP for the exchange (its gradient then
        comes back whole on every TP rank, so the gather's backward keeps this rank's slice);
        `finish_halos` splits it again.
        """
        if self.config.sequence_parallel and self.tp_group.size() > 1:
            c = gather_from_sequence_parallel_region(
                c, tensor_parallel_output_grad=False, group=self.tp_group
            )
        return start_halos(
            torch.cat((c, k_rope), dim=-1), cp, self.config.sliding_window_size - 1,
            self.cp_group, self.layer_number,
        )

    def finish_halos(self, halos: PendingHalos) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys' latents with each chunk's halo in front, [E(/TP), b, d_c] and
        [E, b, d_R]. Under sequence parallelism c is split again over TP, zero-padded to a
        multiple of TP, for the column-parallel up-projection, whose own gather and
        reduce-scatter stay as they are."""
        config = self.config
        latent = halos.wait()  # [E, b, d_c + d_R]
        c, k_rope = latent.split([config.kv_lora_rank, config.qk_pos_emb_head_dim], dim=-1)
        tp_size = self.tp_group.size()
        if config.sequence_parallel and tp_size > 1:
            c = F.pad(c, (0, 0, 0, 0, 0, -c.shape[0] % tp_size))
            c = scatter_to_sequence_parallel_region(c, group=self.tp_group)
        return c, k_rope


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
            out = torch.cat(run_pieces(
                pieces,
                lambda q, k, v, q_offset: nsa_kernels.sliding_window_attention(
                    q, k, v, window, scale=self.softmax_scale, q_offset=q_offset,
                    backend=self.backend,
                ),
                queries=(q,), keys=(k, v),
            ), dim=1)
        return self.to_sequence_major(out)
