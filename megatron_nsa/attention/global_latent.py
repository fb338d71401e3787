"""Global ("G") layers: group-head latent attention with compression and selection.

h_c latent heads: c^j = RMSNorm_j(W^j_DKV x) in R^{d_c'}; one shared RoPE key k^R = RoPE(W_KR x).
Query heads form h_c groups; head h of group j reads latent j through its own up-projections,
k_h = [W_UK_h c^j ; k^R], v_h = W_UV_h c^j. Latent tokens [c^j ; k^R] are compressed block by
block (the compressor's RoPE part is the compressed k^R) and go through the same
up-projections. o = g_cmp o_cmp + g_slc o_slc with [g_cmp, g_slc] = sigmoid(W_g x) per head.

Tensor parallelism: query heads, their up-projections and gates are column parallel; latent
heads move with their query groups (split when h_c >= TP, replicated on TP / h_c ranks
otherwise, see `LatentDownProjection`); W_KR is duplicated.

Context parallelism (docs/context_parallel.md): each rank compresses the blocks whose last
token it holds (with a halo of the l - 1 latent tokens before each chunk) and the compressed
tokens are all-gathered; the raw latent tokens, h_c d_c' + d_R values per token (this
rank's latent heads and the shared k^R), are all-gathered for the selection meanwhile, so
their gather overlaps the compressed attention and the top-n. Every rank up-projects the
whole sequence and scores, selects and attends for its own queries only, one call per
chunk at the chunk's offset; gradients of gathered tokens are reduce-scattered in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

import nsa_kernels

from ..config import ASATransformerConfig
from ..context_parallel import (
    CompressionPiece,
    PendingGather,
    QueryPiece,
    run_pieces,
    start_compressed_gather,
    start_gather,
    start_halos,
)
from ..norm import rms_norm
from ..parallel import (
    HeadPartition,
    gather_from_replicas,
    mark_partitioned,
    param_device,
    replicate_over_tp,
)
from .base import ASACoreAttention, ASASelfAttention, TokenLayout, packed_cu_seqlens, tp_partition
from .fusion import gated_sum, group_cat, rope_cat
from .linear import partitioned_state_dict
from .query import LatentQueryMixin, LatentQuerySubmodules


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
        return rms_norm(x, self.weight, self.eps, fuse=self.config.fuse_elementwise)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return partitioned_state_dict(self, prefix, sharded_offsets, metadata)


@dataclass
class GlobalSelfAttentionSubmodules(LatentQuerySubmodules):
    """Submodules of `GlobalSelfAttention`; the core attention is `GlobalCoreAttention`."""

    linear_latent_down_proj: ModuleSpec | type | None = None
    """hidden -> h_c * d_c', by latent head (`LatentDownProjection`)."""

    latent_layernorm: ModuleSpec | type | None = None
    """Per-latent-head RMSNorm (`LatentNorm`)."""

    linear_kr_proj: ModuleSpec | type | None = None
    """Duplicated hidden -> d_R, the shared RoPE key."""

    linear_gate: ModuleSpec | type | None = None
    """Column-parallel hidden -> heads * 2, the compression and selection gates."""


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
        self.build_rope_core_and_output(submodules)

    def attend(
        self,
        hidden_states: torch.Tensor,
        tokens: TokenLayout,
        packed_seq_params: PackedSeqParams | None,
    ) -> torch.Tensor:
        cp = tokens.cp
        cos, sin = self.rotary.cos_sin(tokens.positions, tokens.length)
        latent, _ = self.linear_latent_down_proj(hidden_states)  # [s, b, h_c_local * d_c']
        latent = self.latent_layernorm(latent.view(*latent.shape[:2], self.latents.local_heads, -1))
        k_rope, _ = self.linear_kr_proj(hidden_states)  # [s(/TP), b, d_R]
        k_rope = replicate_over_tp(
            k_rope, self.tp_group, self.config.sequence_parallel, self.latents.replicas
        )
        latent = rope_cat(
            latent.flatten(2).unsqueeze(2), k_rope.unsqueeze(2), cos, sin,
            fuse=self.config.fuse_elementwise,
        ).squeeze(2)  # [s, b, h_c_local * d_c' + d_R], k^R rotated
        if cp is None:
            query = self.query(hidden_states, cos, sin)  # [s, b, H, d_h + d_R]
            gates = self.gates(hidden_states, query)
            return self.run_core(query, latent, latent, packed_seq_params, gates=gates)
        blocks = (self.config.compress_block_size, self.config.compress_stride)
        halos = start_halos(
            latent, cp, blocks[0] - 1, self.cp_group, self.layer_number, "compress_halo"
        )
        query = self.query(hidden_states, cos, sin)  # overlaps the halo exchange
        compressed = self.core_attention.compress_chunks(
            halos.wait(), cp.compression_pieces(*blocks)
        )  # [blocks this rank owns, b, h_c_local, d_c' + d_R]
        compressed = start_compressed_gather(
            compressed, cp, *blocks, self.cp_group, self.layer_number
        )
        raw = start_gather(latent, cp, self.cp_group, self.layer_number, "latent")
        gates = self.gates(hidden_states, query)  # overlaps the gathers
        compressed = compressed.wait()  # [N, b, h_c_local, d_c' + d_R], global order
        # The core attention waits for the raw latent after its compressed branch, unless it
        # is recomputed (a recomputed region takes tensors).
        keys = raw.wait() if self.recomputes("core_attn") else raw
        return self.run_core(
            query, keys, keys, packed_seq_params, pieces=cp.causal_pieces(blocks),
            gates=gates, compressed=compressed,
        )

    def gates(self, hidden_states: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """[g_cmp, g_slc] = sigmoid(W_g x): [s, b, H, 2] in the query's dtype."""
        gates, _ = self.linear_gate(hidden_states)  # [s, b, H * 2]
        return torch.sigmoid(gates.float()).to(query.dtype).view(*query.shape[:3], 2)


@dataclass
class GlobalCoreAttentionSubmodules:
    """Submodules of `GlobalCoreAttention`."""

    compressor: ModuleSpec | type | None = None
    """Block compressor over latent tokens (`MLPCompressor` or `MeanCompressor`)."""

    linear_kv_up_proj: ModuleSpec | type | None = None
    """Per-head up-projections of latent tokens (`LatentKVUpProjection`)."""


class GlobalCoreAttention(ASACoreAttention):
    """Compression + selection attention from latent tokens (the nsa_kernels ops).

    Takes the latent tokens rather than per-head keys and values: they are h_c * (d_c' + d_R)
    values per token instead of heads * (d_h + d_R + d_v), which is what context parallelism
    exchanges between ranks.
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
        key: torch.Tensor | PendingGather,
        value: torch.Tensor | PendingGather,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        gates: torch.Tensor | None = None,
        compressed: torch.Tensor | None = None,
        pieces: list[QueryPiece] | None = None,
    ) -> torch.Tensor:
        """query [s, b, H, d_h + d_R]; key = value = latent tokens [S, b, h_c * d_c' + d_R]
        (each latent head's c^j, then the shared k^R); gates [s, b, H, 2] (after the
        sigmoid) -> [s, b, H * d_v].

        Under context parallelism S is the whole sequence in global order, read by the query
        `pieces`; `compressed` [N, b, h_c, d_c' + d_R] holds its compressed tokens, and the
        key may be the all-gather still bringing the latent tokens (`PendingGather`), waited
        for after the compressed branch.
        """
        q, gates = self.to_batch_major(query, gates)
        if pieces is None:
            cu_seqlens = packed_cu_seqlens(packed_seq_params)
            tokens = self.latent_tokens(key).transpose(0, 1)  # [b, S, h_c, d_c' + d_R]
            compressed = self.compressor(tokens, cu_seqlens)  # [b, N, h_c, d_c' + d_R]
            k_cmp, v_cmp = self.linear_kv_up_proj(compressed)
            o_cmp, indices = self.compressed_branch(q, k_cmp, v_cmp, cu_seqlens=cu_seqlens)
            k, v = self.linear_kv_up_proj(tokens)
            out = self.selected_branch(q, gates, o_cmp, indices, k, v, cu_seqlens=cu_seqlens)
            return self.to_sequence_major(out)
        k_cmp, v_cmp = self.linear_kv_up_proj(compressed.transpose(0, 1))
        branch = run_pieces(
            pieces, self.compressed_branch, queries=(q,), compressed=(k_cmp, v_cmp)
        )
        o_cmp = torch.cat([o for o, _ in branch], dim=1)  # [b, s, H, d_v]
        indices = torch.cat([i for _, i in branch], dim=1)  # [b, s, groups, n]
        if isinstance(key, PendingGather):  # the raw latent's gather overlapped the above
            key = key.wait()
        k, v = self.linear_kv_up_proj(self.latent_tokens(key).transpose(0, 1))
        out = run_pieces(
            pieces, self.selected_branch, queries=(q, gates, o_cmp, indices), keys=(k, v)
        )
        return self.to_sequence_major(torch.cat(out, dim=1))

    def latent_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        """[..., h_c * d_c' + d_R] -> [..., h_c, d_c' + d_R]: [c^j ; k^R] per latent head."""
        d_r = self.config.qk_pos_emb_head_dim
        c, k_rope = latent.split([latent.shape[-1] - d_r, d_r], dim=-1)
        c = c.unflatten(-1, (self.latents.local_heads, -1))
        return group_cat(c, k_rope.unsqueeze(-2), fuse=self.config.fuse_elementwise)

    def compress_chunks(
        self, latent: torch.Tensor, pieces: list[CompressionPiece]
    ) -> torch.Tensor:
        """latent [E, b, h_c * d_c' + d_R]: this rank's chunks, each after its l - 1 token
        halo -> the compressed tokens [n, b, h_c, d_c' + d_R] of the blocks the chunks own
        (context parallelism), in the order of `pieces`."""
        tokens = self.latent_tokens(latent).transpose(0, 1)  # [b, E, h_c, d_c' + d_R]
        compressed = [self.compressor(tokens[:, piece.rows]) for piece in pieces]
        return torch.cat(compressed, dim=1).transpose(0, 1)

    def op_arguments(self, cu_seqlens: torch.Tensor | None, q_offset: int) -> dict:
        """Keyword arguments every nsa_kernels op of the layer takes."""
        return {
            "scale": self.softmax_scale,
            "cu_seqlens": cu_seqlens,
            "q_offset": q_offset,
            "backend": self.backend,
        }

    def compressed_branch(
        self,
        q: torch.Tensor,
        k_cmp: torch.Tensor,
        v_cmp: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        q_offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """o_cmp [b, t, H, d_v] and the selected blocks [b, t, groups, n] of queries q
        [b, t, H, d] at positions q_offset + i, against the compressed keys k_cmp, v_cmp
        [b, N, H, d] of their q_offset + t keys.

        A latent's query group shares one selection, scored by all its heads (NSA Eq. 10).
        When this rank holds only part of a group (a latent replicated over TP ranks), the
        ranks that share the latent exchange their queries and compressed keys so that each
        scores the whole group, as one rank would without tensor parallelism.
        """
        config = self.config
        common = self.op_arguments(cu_seqlens, q_offset)
        blocks = {"block_size": config.compress_block_size, "stride": config.compress_stride}
        o_cmp, lse = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, **blocks, **common)
        selection = {
            "select_block_size": config.select_block_size,
            "top_n": config.select_top_n,
            "selection_query_block": config.selection_query_block,
        }
        if self.latents.replicas > 1:
            gather = partial(gather_from_replicas, partition=self.latents, tp_group=self.tp_group)
            indices = nsa_kernels.select_blocks(
                gather(q.detach(), dim=2), gather(k_cmp.detach(), dim=2),
                num_selection_heads=1, **blocks, **selection, **common,
            )
        else:
            indices = nsa_kernels.select_blocks(
                q, k_cmp, num_selection_heads=self.latents.local_heads, lse=lse.detach(),
                **blocks, **selection, **common,
            )
        return o_cmp, indices

    def selected_branch(
        self,
        q: torch.Tensor,
        gates: torch.Tensor,
        o_cmp: torch.Tensor,
        indices: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        q_offset: int = 0,
    ) -> torch.Tensor:
        """g_cmp o_cmp + g_slc o_slc [b, t, H, d_v]: o_slc attends to the selected blocks
        (`indices`) of the keys k, v [b, q_offset + t, H, d]; gates [b, t, H, 2]."""
        o_slc = nsa_kernels.selected_attention(
            q, k, v, indices, self.config.select_block_size,
            selection_query_block=self.config.selection_query_block,
            deterministic=self.config.deterministic_mode,
            **self.op_arguments(cu_seqlens, q_offset),
        )
        return gated_sum(gates, o_cmp, o_slc, fuse=self.config.fuse_elementwise)
