"""Global ("G") layers: group-head latent attention with compression and selection.

h_c latent heads: c^j = RMSNorm_j(W^j_DKV x) in R^{d_c'}; one shared RoPE key k^R = RoPE(W_KR x).
Query heads form h_c groups; head h of group j reads latent j through its own up-projections,
k_h = [W_UK_h c^j ; k^R], v_h = W_UV_h c^j. Latent tokens [c^j ; k^R] are compressed block by
block (the compressor's RoPE part is the compressed k^R) and go through the same
up-projections. o = g_cmp o_cmp + g_slc o_slc with [g_cmp, g_slc] = sigmoid(W_g x) per head.

Tensor parallelism: query heads, their up-projections and gates are column parallel; latent
heads move with their query groups (split when h_c >= TP, replicated on TP / h_c ranks
otherwise, see `LatentDownProjection`); W_KR is duplicated.

Context parallelism: the raw latent tokens, h_c d_c' + d_R values per token (this rank's
latent heads and the shared k^R), are all-gathered over the CP group into global order,
started before the query projection so the two overlap. Every rank compresses the whole
latent sequence itself (cheaper than exchanging compressed tokens whose blocks straddle
chunks) and scores, selects and attends for its own queries only, one call per chunk at the
chunk's offset; the gradient of the gathered latents is reduce-scattered back in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import nsa_kernels
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from nsa_kernels import compressed_cu_seqlens, num_compressed_blocks

from ..config import ASATransformerConfig
from ..context_parallel import QueryPiece, start_gather
from ..parallel import (
    HeadPartition,
    gather_from_replicas,
    mark_partitioned,
    param_device,
    replicate_over_tp,
)
from .base import (
    ASACoreAttention,
    ASASelfAttention,
    TokenLayout,
    packed_cu_seqlens,
    query_chunks,
    tp_partition,
)
from .linear import partitioned_state_dict
from .query import LatentQueryMixin
from .rope import Rotary, default_softmax_scale


class LatentNorm(MegatronModule):
    """RMSNorm_j per latent head: x [..., h_c_local, d] -> normalized, weight [h_c_local, d].

    Applied to full-sequence latents, so no sequence-parallel gradient sum is needed; the
    weight is split or replicated with the latent heads.
    """

    def __init__(self, config: ASATransformerConfig, dim: int, partition: HeadPartition):
        super().__init__(config=config)
        self.partition, self.eps = partition, config.layernorm_epsilon
        self.weight = torch.nn.Parameter(
            torch.ones(
                partition.local_heads, dim, device=param_device(config), dtype=config.params_dtype
            )
        )
        mark_partitioned(self.weight, partition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return partitioned_state_dict(self, prefix, sharded_offsets, metadata)


@dataclass
class GlobalSelfAttentionSubmodules:
    """Submodules of `GlobalSelfAttention`."""

    linear_q_proj: ModuleSpec | type | None = None
    """Column-parallel hidden -> heads * (d_h + d_R), used when q_lora_rank is None."""

    linear_q_down_proj: ModuleSpec | type | None = None
    """Duplicated hidden -> q_lora_rank, used when q_lora_rank is set."""

    linear_q_up_proj: ModuleSpec | type | None = None
    """Column-parallel q_lora_rank -> heads * (d_h + d_R)."""

    q_layernorm: ModuleSpec | type | None = None
    """Norm of the low-rank query."""

    linear_latent_down_proj: ModuleSpec | type | None = None
    """hidden -> h_c * d_c', by latent head (`LatentDownProjection`)."""

    latent_layernorm: ModuleSpec | type | None = None
    """Per-latent-head RMSNorm (`LatentNorm`)."""

    linear_kr_proj: ModuleSpec | type | None = None
    """Duplicated hidden -> d_R, the shared RoPE key."""

    linear_gate: ModuleSpec | type | None = None
    """Column-parallel hidden -> heads * 2, the compression and selection gates."""

    core_attention: ModuleSpec | type | None = None
    """Compression + selection core attention (`GlobalCoreAttention`)."""

    linear_proj: ModuleSpec | type | None = None
    """Row-parallel heads * d_v -> hidden."""


class GlobalSelfAttention(LatentQueryMixin, ASASelfAttention):
    """GLA with compression and selection; [s(/TP), b, h] -> ([s(/TP), b, h], bias)."""

    def __init__(
        self,
        config: ASATransformerConfig,
        submodules: GlobalSelfAttentionSubmodules,
        layer_number: int,
        **kwargs,
    ) -> None:
        """kwargs: Megatron's attention arguments (attn_mask_type, pg_collection, ...)."""
        super().__init__(config, layer_number, **kwargs)
        self.latents = tp_partition(
            config.global_num_latent_heads, self.tp_group, "global_num_latent_heads"
        )
        self.build_query(submodules)
        d_latent, d_r = config.global_kv_lora_rank, config.qk_pos_emb_head_dim
        self.linear_latent_down_proj = build_module(
            submodules.linear_latent_down_proj,
            config.hidden_size,
            d_latent,
            config=config,
            init_method=config.init_method,
            partition=self.latents,
            tp_group=self.tp_group,
        )
        self.latent_layernorm = build_module(
            submodules.latent_layernorm, config=config, dim=d_latent, partition=self.latents
        )
        self.linear_kr_proj = self.duplicated(submodules.linear_kr_proj, config.hidden_size, d_r)
        self.linear_gate = self.column_parallel(
            submodules.linear_gate, config.hidden_size, config.num_attention_heads * 2, "gate",
            bias=True,
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
        cp = tokens.cp
        cos, sin = self.rotary.cos_sin(tokens.positions, tokens.length)
        latent, _ = self.linear_latent_down_proj(hidden_states)  # [s, b, h_c_local * d_c']
        latent = self.latent_layernorm(latent.view(*latent.shape[:2], self.latents.local_heads, -1))
        k_rope, _ = self.linear_kr_proj(hidden_states)  # [s(/TP), b, d_R]
        k_rope = replicate_over_tp(
            k_rope, self.tp_group, config.sequence_parallel, self.latents.replicas
        )
        k_rope = Rotary.rotate(k_rope.unsqueeze(2), cos, sin)  # [s, b, 1, d_R]
        if cp is not None:
            flat = torch.cat((latent.flatten(2), k_rope.squeeze(2)), dim=-1)
            pending = start_gather(flat, cp, self.cp_group, self.layer_number, "latent")
        query = self.query(hidden_states, cos, sin)  # [s, b, H, d_h + d_R]
        gates, _ = self.linear_gate(hidden_states)  # [s, b, H * 2]
        gates = torch.sigmoid(gates.float()).to(query.dtype).view(*query.shape[:3], 2)
        if cp is not None:
            flat = pending.wait()  # [S, b, h_c_local * d_c' + d_R], global order
            heads, width = latent.shape[2:]
            latent, k_rope = flat.split([heads * width, k_rope.shape[-1]], dim=-1)
            latent = latent.view(*flat.shape[:2], heads, width)
            k_rope = k_rope.unsqueeze(2)
        k_rope = k_rope.expand(*latent.shape[:3], -1)
        latent_tokens = torch.cat((latent, k_rope), dim=-1)  # [S, b, h_c_local, d_c' + d_R]
        return self.run_core(
            query, latent_tokens, latent_tokens, packed_seq_params, gates,
            pieces=None if cp is None else cp.causal_pieces(),
        )


@dataclass
class GlobalCoreAttentionSubmodules:
    """Submodules of `GlobalCoreAttention`."""

    compressor: ModuleSpec | type | None = None
    """Block compressor over latent tokens (`MLPCompressor` or `MeanCompressor`)."""

    linear_kv_up_proj: ModuleSpec | type | None = None
    """Per-head up-projections of latent tokens (`LatentKVUpProjection`)."""


class GlobalCoreAttention(ASACoreAttention):
    """Compression + selection attention from latent tokens (nsa_kernels.nsa_attention).

    Takes the latent tokens rather than per-head keys and values: they are h_c * (d_c' + d_R)
    values per token instead of heads * (d_h + d_R + d_v), which is what context parallelism
    will exchange between ranks.
    """

    def __init__(self, *args, submodules: GlobalCoreAttentionSubmodules, **kwargs) -> None:
        """args, kwargs: Megatron's CoreAttention arguments (see ASACoreAttention)."""
        super().__init__(*args, **kwargs)
        config = self.config
        self.heads = tp_partition(config.num_attention_heads, self.tp_group, "query heads")
        self.latents = tp_partition(
            config.global_num_latent_heads, self.tp_group, "global_num_latent_heads"
        )
        token_dim = config.global_kv_lora_rank + config.qk_pos_emb_head_dim
        self.compressor = build_module(
            submodules.compressor, config=config, head_dim=token_dim, partition=self.latents
        )
        self.linear_kv_up_proj = build_module(
            submodules.linear_kv_up_proj,
            config=config,
            init_method=config.init_method,
            heads=self.heads,
            latents=self.latents,
            tp_group=self.tp_group,
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
        """query [s, b, H, d_h + d_R]; key = value = latent tokens [S, b, h_c, d_c' + d_R];
        gates [s, b, H, 2] (after the sigmoid) -> [s, b, H * d_v]. S = s, or under context
        parallelism the whole sequence in global order, read by the query `pieces`."""
        config = self.config
        cu_seqlens = packed_cu_seqlens(packed_seq_params)
        q, tokens, gates = self.to_batch_major(query, key, gates)
        compressed = self.compressor(tokens, cu_seqlens)  # [b, n, h_c, d_c' + d_R]
        k, v = self.linear_kv_up_proj(torch.cat((tokens, compressed), dim=1))
        length = tokens.shape[1]
        k, k_cmp = k[:, :length], k[:, length:]
        v, v_cmp = v[:, :length], v[:, length:]
        if pieces is None:
            out = self.branches(q, k, v, k_cmp, v_cmp, gates, cu_seqlens)
            return self.to_sequence_major(out)
        cmp_starts = [0] if cu_seqlens is None else compressed_cu_seqlens(
            cu_seqlens, config.compress_block_size, config.compress_stride
        ).tolist()

        def attend(piece: QueryPiece) -> torch.Tensor:
            first = cmp_starts[piece.doc]
            blocks = slice(first, first + num_compressed_blocks(
                piece.k_len, config.compress_block_size, config.compress_stride
            ))
            return self.branches(
                q[:, piece.queries], k[:, piece.keys], v[:, piece.keys], k_cmp[:, blocks],
                v_cmp[:, blocks], gates[:, piece.queries], None, piece.q_offset,
            )

        return self.to_sequence_major(query_chunks(q, pieces, attend))

    def branches(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cmp: torch.Tensor,
        v_cmp: torch.Tensor,
        gates: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        q_offset: int = 0,
    ) -> torch.Tensor:
        """g_cmp o_cmp + g_slc o_slc for queries q [b, t, H, d] at positions q_offset + i of
        the keys k, v [b, q_offset + t, H, d] and their compressed blocks -> [b, t, H, d_v]."""
        config = self.config
        blocks = {
            "block_size": config.compress_block_size,
            "stride": config.compress_stride,
            "scale": self.softmax_scale,
            "cu_seqlens": cu_seqlens,
            "q_offset": q_offset,
            "backend": self.backend,
        }
        if self.latents.replicas > 1:
            return self.replicated_latent_attention(q, k, v, k_cmp, v_cmp, gates, blocks)
        return nsa_kernels.nsa_attention(
            q, k, v, k_cmp, v_cmp, gates[..., 0], gates[..., 1],
            select_block_size=config.select_block_size,
            top_n=config.select_top_n,
            num_selection_heads=self.latents.local_heads,
            selection_query_block=config.selection_query_block,
            **blocks,
        )

    def replicated_latent_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cmp: torch.Tensor,
        v_cmp: torch.Tensor,
        gates: torch.Tensor,
        blocks: dict,
    ) -> torch.Tensor:
        """nsa_attention's branches when this rank holds only part of its latent's query group.

        The group shares one selection, scored by all its heads (NSA Eq. 10): the ranks
        that share the latent exchange their queries and compressed keys so each scores the
        whole group, as one rank would without tensor parallelism.
        """
        config = self.config
        o_cmp, _ = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, **blocks)
        gather = partial(gather_from_replicas, partition=self.latents, tp_group=self.tp_group)
        indices = nsa_kernels.select_blocks(
            gather(q.detach(), dim=2),
            gather(k_cmp.detach(), dim=2),
            select_block_size=config.select_block_size,
            top_n=config.select_top_n,
            num_selection_heads=1,
            selection_query_block=config.selection_query_block,
            **blocks,
        )
        o_slc = nsa_kernels.selected_attention(
            q, k, v, indices, config.select_block_size, scale=blocks["scale"],
            cu_seqlens=blocks["cu_seqlens"], q_offset=blocks["q_offset"], backend=blocks["backend"],
        )
        return gates[..., :1] * o_cmp + gates[..., 1:] * o_slc
