"""What every ASA attention module shares: Megatron's calling conventions and checks.

Self-attention modules follow what `TransformerLayer` passes (hidden states [s, b, h] plus
keyword arguments) and return (output, bias). Core attention modules follow Megatron's
`CoreAttention` interface: built with config, layer_number, attn_mask_type, attention_type,
cp_comm_type, softmax_scale, pg_collection, k_channels, v_channels; called on
[s, b, heads, dim] tensors; return [s, b, heads * v_dim].

Context parallelism (docs/context_parallel.md): the self-attention modules exchange what the
layer kind needs over the CP group (they hold the latents, which are far smaller than
per-head keys and values), and the core attention modules run one call per query piece of
`ContextParallelLayout`, each at its offset into the keys. Megatron's `cp_comm_type` is
accepted and not used: each layer kind has its own exchange.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from ..compat import check_megatron_core_version
from ..config import ASATransformerConfig
from ..context_parallel import ContextParallelLayout, QueryPiece
from ..norm import supports_sequence_parallel
from ..parallel import HeadPartition


@dataclass
class ASASelfAttentionSubmodules:
    """The submodules every ASA self-attention has; each layer kind adds its projections."""

    core_attention: ModuleSpec | type | None = None
    """The layer kind's core attention."""

    linear_proj: ModuleSpec | type | None = None
    """Row-parallel heads * d_v -> hidden."""


@dataclass
class TokenLayout:
    """The tokens of one forward pass, as the attention ops need them."""

    length: int
    """Full sequence length s (all packed documents together for THD input), over every
    context-parallel rank."""

    positions: torch.Tensor
    """[s_local] RoPE position of every local token (restarting at each packed document)."""

    cu_seqlens: torch.Tensor | None
    """Packed document offsets [num_docs + 1] of the whole batch, or None for [s, b] batches."""

    cp: ContextParallelLayout | None = None
    """The context-parallel split, or None without context parallelism."""


def packed_cu_seqlens(packed_seq_params: PackedSeqParams | None) -> torch.Tensor | None:
    """cu_seqlens of THD-packed input (the padded ones when given, as Megatron's MLA)."""
    if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
        return None
    if packed_seq_params.cu_seqlens_q_padded is not None:
        return packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q


def token_layout(
    length: int,
    packed_seq_params: PackedSeqParams | None,
    device: torch.device,
    cp_group: torch.distributed.ProcessGroup | None = None,
) -> TokenLayout:
    """Positions 0..s-1, or per-document positions of a packed sequence; under context
    parallelism the global positions of this rank's `length` tokens."""
    cu_seqlens = packed_cu_seqlens(packed_seq_params)
    if cp_group is not None and cp_group.size() > 1:
        cp = ContextParallelLayout.build(cp_group, length, cu_seqlens)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device)
        return TokenLayout(cp.global_length, cp.positions(device), cu_seqlens, cp)
    positions = torch.arange(length, device=device)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device)
        starts = cu_seqlens[:-1].long()
        doc = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
        positions = positions - starts[doc.clamp(max=starts.numel() - 1)]
    return TokenLayout(length, positions, cu_seqlens)


def check_context_parallel(
    config: TransformerConfig, pg_collection: ProcessGroupCollection
) -> None:
    """The CP group the module is given must be the one the config describes: positions and
    the split are derived from it, so a mismatch would silently mix up tokens."""
    cp_group = getattr(pg_collection, "cp", None)
    cp_size = cp_group.size() if cp_group is not None else 1
    if cp_size != config.context_parallel_size:
        raise ValueError(
            f"the context-parallel group has {cp_size} ranks but config.context_parallel_size="
            f"{config.context_parallel_size}; pass the CP group of the model's layout "
            "(pg_collection.cp / parallel_state.get_context_parallel_group()) and set "
            "context_parallel_size to its size"
        )


def tp_partition(
    num_heads: int, tp_group: torch.distributed.ProcessGroup, what: str
) -> HeadPartition:
    """HeadPartition of `num_heads` over the TP group, with a clear error when it cannot split."""
    try:
        return HeadPartition(num_heads, tp_group.size(), tp_group.rank())
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


class ASASelfAttention(MegatronModule):
    """Base of the ASA self-attention modules: checks, output projection, forward plumbing.

    Built with the keyword arguments `TransformerLayer` passes (`pp_layer_offset` and `name`
    come from megatron-core 0.19 and are not needed here). Subclasses implement
    `attend(hidden_states, tokens, packed_seq_params)` -> core attention output
    [s, b, heads_local * v_dim].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        pp_layer_offset: int | None = None,
        name: str | None = None,
    ) -> None:
        check_megatron_core_version()
        if not isinstance(config, ASATransformerConfig):
            raise TypeError(
                f"{type(self).__name__} needs a megatron_nsa.ASATransformerConfig, got "
                f"{type(config).__name__}"
            )
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        check_context_parallel(config, pg_collection)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"ASA attention is causal; got attn_mask_type={attn_mask_type}")
        self.pg_collection, self.tp_group = pg_collection, pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        self.layer_number, self.attn_mask_type = layer_number, attn_mask_type
        self.cp_comm_type = cp_comm_type
        tp_size = self.tp_group.size()
        if config.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} must be a multiple of the "
                f"tensor parallel size {tp_size}"
            )
        self.heads = HeadPartition(config.num_attention_heads, tp_size, self.tp_group.rank())
        selective = config.recompute_granularity == "selective"
        self.recompute_modules = set(config.recompute_modules or ()) if selective else set()

    def check_norm(self, norm: object, what: str) -> None:
        """Refuse, at construction, a norm that breaks under sequence parallelism."""
        if self.config.sequence_parallel and not supports_sequence_parallel(norm):
            name = getattr(getattr(norm, "module", norm), "__name__", repr(norm))
            raise ValueError(
                f"{what} is {name}, which does not support sequence parallelism; use "
                "megatron_nsa.norm.Norm (or Transformer Engine's TENorm) or turn "
                "sequence_parallel off"
            )

    def build_core_attention(
        self, spec: ModuleSpec | type, softmax_scale: float, k_channels: int, v_channels: int
    ) -> torch.nn.Module:
        """Build the core attention with Megatron's CoreAttention keyword arguments."""
        return build_module(
            spec,
            config=self.config,
            layer_number=self.layer_number,
            attn_mask_type=self.attn_mask_type,
            attention_type="self",
            cp_comm_type=self.cp_comm_type,
            softmax_scale=softmax_scale,
            k_channels=k_channels,
            v_channels=v_channels,
            pg_collection=self.pg_collection,
        )

    def build_output_projection(self, spec: ModuleSpec | type, input_size: int) -> None:
        """linear_proj: row-parallel [heads * v_dim] -> hidden, bias added by the layer."""
        self.linear_proj = build_module(
            spec,
            input_size,
            self.config.hidden_size,
            config=self.config,
            init_method=self.config.output_layer_init_method,
            bias=self.config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.tp_group,
        )

    def column_parallel(
        self, spec: ModuleSpec | type, input_size: int, output_size: int, name: str, bias=False
    ) -> torch.nn.Module:
        """A column-parallel projection of the layer input (split over query heads)."""
        return build_module(
            spec,
            input_size,
            output_size,
            config=self.config,
            init_method=self.config.init_method,
            gather_output=False,
            bias=bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name=name,
            tp_group=self.tp_group,
        )

    def duplicated(self, spec: ModuleSpec | type, input_size: int, output_size: int):
        """A projection replicated on every TP rank (see `DuplicatedLinear`)."""
        return build_module(
            spec,
            input_size,
            output_size,
            config=self.config,
            init_method=self.config.init_method,
            bias=False,
            skip_bias_add=False,
        )

    def run_core(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        packed_seq_params: PackedSeqParams | None,
        checkpoint: bool = True,
        pieces: list[QueryPiece] | None = None,
        **tensors: torch.Tensor,
    ) -> torch.Tensor:
        """Core attention, recomputed in the backward when "core_attn" recompute is on (and
        `checkpoint`, False inside a larger recomputed region). `pieces`: the query pieces
        under context parallelism (keys then span more tokens than the query); `tensors`:
        further inputs of the layer kind's core attention (gates, compressed tokens)."""
        names = list(tensors)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extra: torch.Tensor):
            kwargs = dict(zip(names, extra, strict=True))
            if pieces is not None:
                kwargs["pieces"] = pieces
            return self.core_attention(
                q, k, v, None, attn_mask_type=self.attn_mask_type,
                packed_seq_params=packed_seq_params, **kwargs,
            )

        args = (query, key, value, *tensors.values())
        if not checkpoint:
            return run(*args)
        return self.maybe_checkpoint("core_attn", run, *args)

    def recomputes(self, module: str) -> bool:
        """Whether `module`'s activations are recomputed in the backward (selective)."""
        return module in self.recompute_modules and self.training

    def maybe_checkpoint(self, module: str, fn: Callable, *args: torch.Tensor):
        """fn(*args), with activations recomputed in the backward when `module` is selected."""
        if self.recomputes(module):
            return tensor_parallel.checkpoint(fn, False, *args)
        return fn(*args)

    def attend(
        self,
        hidden_states: torch.Tensor,
        tokens: TokenLayout,
        packed_seq_params: PackedSeqParams | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        inference_context: object | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        rotary_pos_cos: torch.Tensor | None = None,
        rotary_pos_sin: torch.Tensor | None = None,
        rotary_pos_cos_sin: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_len_offset: torch.Tensor | None = None,
        *,
        inference_params: object | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [s(/TP), b, h] -> (output [s(/TP), b, h], bias).

        The attention is causal by construction, so `attention_mask` is not read (pass
        document boundaries as packed sequences); RoPE is applied inside, so rotary inputs
        from the model are not read either.
        """
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("ASA attention in Megatron does not implement inference")
        if key_value_states is not None or attention_bias is not None:
            raise NotImplementedError("ASA attention takes neither key_value_states nor a bias")
        length = hidden_states.shape[0]
        if self.config.sequence_parallel:
            length *= self.tp_group.size()
        tokens = token_layout(length, packed_seq_params, hidden_states.device, self.cp_group)
        if tokens.cp is not None and set(self.config.attention_pattern) & {"G", "N"}:
            # Checked by every layer, so the first one refuses the batch before any exchange.
            tokens.cp.check_chunk_multiple(
                self.config.selection_query_block, "selection_query_block"
            )
        return self.linear_proj(self.attend(hidden_states, tokens, packed_seq_params))


class ASACoreAttention(MegatronModule):
    """Base of the ASA core attention modules: Megatron's CoreAttention constructor.

    Under context parallelism the forward also takes `pieces` (`ContextParallelLayout`'s
    query pieces): the query holds this rank's tokens, the keys (and values) the tokens those
    pieces read, gathered or with halos, and each piece is one op call at its offset.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
    ) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        check_context_parallel(config, pg_collection)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError(
                f"{type(self).__name__} is causal self-attention; got {attn_mask_type}, "
                f"{attention_type!r}"
            )
        self.pg_collection, self.tp_group = pg_collection, pg_collection.tp
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.k_channels, self.v_channels = k_channels, v_channels
        self.backend = getattr(config, "nsa_backend", "auto")

    @staticmethod
    def to_batch_major(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[s, b, ...] -> [b, s, ...], the layout of the nsa_kernels ops."""
        return tuple(t.transpose(0, 1) for t in tensors)

    @staticmethod
    def to_sequence_major(out: torch.Tensor) -> torch.Tensor:
        """[b, s, heads, d] -> [s, b, heads * d], Megatron's core attention output."""
        return out.transpose(0, 1).reshape(out.shape[1], out.shape[0], -1)
