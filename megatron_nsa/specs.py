"""Layer and block specs that put ASA attention into Megatron-Core's GPTModel.

- `get_asa_decoder_block_spec(config, ...)`: a `TransformerBlockSubmodules` with one layer
  spec per layer of this pipeline stage (virtual stage included), each of the kind its
  global layer number gives (`config.layer_kind(n)`), with a dense MLP or Megatron's MoE.
  Pass it as `GPTModel(transformer_layer_spec=...)`.
- `get_asa_layer_spec(config, layer_kind, ...)`: the spec of one layer.
- `asa_layer_spec`: one layer spec for every layer, which picks its kind when built; for
  Megatron-LM's `--spec megatron_nsa.specs asa_layer_spec` (see docs/megatron.md).

Backends: Megatron's own parallel linears (local), or Transformer Engine's when it is
importable and asked for (`use_transformer_engine=True`, or None with
`config.transformer_impl == "transformer_engine"`).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from .attention import (
    DenseCoreAttention,
    DenseSelfAttention,
    DenseSelfAttentionSubmodules,
    DuplicatedLinear,
    GlobalCoreAttention,
    GlobalCoreAttentionSubmodules,
    GlobalSelfAttention,
    GlobalSelfAttentionSubmodules,
    LatentDownProjection,
    LatentKVUpProjection,
    LatentNorm,
    LocalSelfAttention,
    LocalSelfAttentionSubmodules,
    MeanCompressor,
    MLPCompressor,
    NSACoreAttention,
    NSACoreAttentionSubmodules,
    NSASelfAttention,
    NSASelfAttentionSubmodules,
    SlidingWindowCoreAttention,
    TEDuplicatedLinear,
)
from .compat import check_megatron_core_version, have_transformer_engine
from .config import LAYER_KINDS, ASATransformerConfig
from .norm import Norm, supports_sequence_parallel


class _Backend:
    """The linear and norm classes of one backend (Megatron's local layers or TE)."""

    def __init__(self, use_transformer_engine: bool) -> None:
        self.te = use_transformer_engine
        if use_transformer_engine:
            from megatron.core.extensions.transformer_engine import (
                TEColumnParallelLinear,
                TENorm,
                TERowParallelLinear,
            )
            from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

            self.column, self.row, self.norm = TEColumnParallelLinear, TERowParallelLinear, TENorm
            self.duplicated, self.provider = TEDuplicatedLinear, TESpecProvider()
        else:
            self.column, self.row, self.norm = ColumnParallelLinear, RowParallelLinear, Norm
            self.duplicated, self.provider = DuplicatedLinear, LocalSpecProvider()


def _resolve_transformer_engine(
    config: ASATransformerConfig, use_transformer_engine: bool | None
) -> bool:
    if use_transformer_engine is None:
        return have_transformer_engine() and config.transformer_impl == "transformer_engine"
    if use_transformer_engine and not have_transformer_engine():
        raise ImportError(
            "use_transformer_engine=True, but transformer_engine cannot be imported; install "
            "megatron-nsa[te] or pass use_transformer_engine=False"
        )
    return use_transformer_engine


def _check_config(config: ASATransformerConfig) -> None:
    check_megatron_core_version()
    if not isinstance(config, ASATransformerConfig):
        raise TypeError(
            f"ASA specs need a megatron_nsa.ASATransformerConfig, got {type(config).__name__}"
        )


def _attention_spec(kind: str, config: ASATransformerConfig, backend: _Backend) -> ModuleSpec:
    norm, column, duplicated = backend.norm, backend.column, backend.duplicated
    causal = {"attn_mask_type": AttnMaskType.causal}
    compressor = MLPCompressor if config.compressor == "mlp" else MeanCompressor
    if kind == "L":
        submodules = LocalSelfAttentionSubmodules(
            linear_q_proj=column,
            linear_q_down_proj=duplicated,
            linear_q_up_proj=column,
            q_layernorm=norm,
            linear_kv_down_proj=duplicated,
            kv_layernorm=norm,
            linear_kv_up_proj=column,
            core_attention=SlidingWindowCoreAttention,
            linear_proj=backend.row,
        )
        return ModuleSpec(module=LocalSelfAttention, params=causal, submodules=submodules)
    if kind == "G":
        core = ModuleSpec(
            module=GlobalCoreAttention,
            submodules=GlobalCoreAttentionSubmodules(
                compressor=compressor, linear_kv_up_proj=LatentKVUpProjection
            ),
        )
        submodules = GlobalSelfAttentionSubmodules(
            linear_q_proj=column,
            linear_q_down_proj=duplicated,
            linear_q_up_proj=column,
            q_layernorm=norm,
            linear_latent_down_proj=LatentDownProjection,
            latent_layernorm=LatentNorm,
            linear_kr_proj=duplicated,
            linear_gate=column,
            core_attention=core,
            linear_proj=backend.row,
        )
        return ModuleSpec(module=GlobalSelfAttention, params=causal, submodules=submodules)
    if kind == "D":
        submodules = DenseSelfAttentionSubmodules(
            linear_qkv=column, core_attention=DenseCoreAttention, linear_proj=backend.row
        )
        return ModuleSpec(module=DenseSelfAttention, params=causal, submodules=submodules)
    if kind == "N":
        core = ModuleSpec(
            module=NSACoreAttention,
            submodules=NSACoreAttentionSubmodules(compressor=compressor),
        )
        submodules = NSASelfAttentionSubmodules(
            linear_qkv=column, linear_gate=column, core_attention=core, linear_proj=backend.row
        )
        return ModuleSpec(module=NSASelfAttention, params=causal, submodules=submodules)
    raise ValueError(f"layer_kind={kind!r} is not one of {', '.join(LAYER_KINDS)}")


def _check_norm(config: ASATransformerConfig, norm: type) -> None:
    if config.sequence_parallel and not supports_sequence_parallel(norm):
        raise ValueError(
            f"norm={getattr(norm, '__name__', norm)} does not support sequence parallelism; "
            "use megatron_nsa.norm.Norm (or Transformer Engine's TENorm) or turn "
            "sequence_parallel off"
        )


def is_moe_layer(config: ASATransformerConfig, layer_number: int) -> bool:
    """Whether the layer with this global 1-based number has experts (config.moe_layer_freq)."""
    if config.num_moe_experts is None:
        return False
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return (layer_number - 1) % freq == 0
    return bool(freq[layer_number - 1])


def get_asa_layer_spec(
    config: ASATransformerConfig,
    layer_kind: str,
    use_transformer_engine: bool | None = None,
    *,
    moe: bool | None = None,
    norm: type | None = None,
) -> ModuleSpec:
    """Spec of one transformer layer whose attention is of `layer_kind` ("L", "G", "D", "N").

    moe: whether the MLP is Megatron's MoE (default: config.num_moe_experts is set).
    norm: class of the layer's norms (default: Transformer Engine's TENorm with TE,
    megatron_nsa.norm.Norm otherwise); it must support sequence parallelism when on.
    """
    _check_config(config)
    backend = _Backend(_resolve_transformer_engine(config, use_transformer_engine))
    if norm is not None:
        backend.norm = norm
    _check_norm(config, backend.norm)
    moe = config.num_moe_experts is not None if moe is None else moe
    mlp = get_mlp_module_spec_for_backend(
        backend=backend.provider,
        num_experts=config.num_moe_experts if moe else None,
        moe_grouped_gemm=config.moe_grouped_gemm,
    )
    # TE's dense MLP fuses its norm into the first linear.
    fused_mlp_norm = backend.te and not moe and backend.provider.fuse_layernorm_and_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.norm,
            self_attention=_attention_spec(layer_kind, config, backend),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if fused_mlp_norm else backend.norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def stage_layer_numbers(
    config: ASATransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None
) -> list[int]:
    """Global 1-based numbers of the layers this pipeline (and virtual) stage builds."""
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        ids = layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank
        )
        return [i + 1 for i in ids]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset + 1, offset + count + 1))


def get_asa_decoder_block_spec(
    config: ASATransformerConfig,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    *,
    pp_rank: int | None = None,
    norm: type | None = None,
) -> TransformerBlockSubmodules:
    """Layer specs of this pipeline stage, each of the kind its global layer number gives.

    vp_stage / pp_rank: the virtual pipeline stage and pipeline rank to build for (default:
    this rank's, from parallel_state). norm: see `get_asa_layer_spec`.
    """
    _check_config(config)
    use_te = _resolve_transformer_engine(config, use_transformer_engine)
    layer_specs = [
        get_asa_layer_spec(
            config, config.layer_kind(n), use_te, moe=is_moe_layer(config, n), norm=norm
        )
        for n in stage_layer_numbers(config, vp_stage, pp_rank)
    ]
    final_norm = norm or _Backend(use_te).norm
    _check_norm(config, final_norm)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)


class ASATransformerLayer(TransformerLayer):
    """A TransformerLayer that builds the ASA layer its global number asks for.

    Lets one static spec (`asa_layer_spec`) serve every layer, for tools that take a single
    layer spec such as Megatron-LM's `--spec`.
    """

    def __init__(
        self,
        config: ASATransformerConfig,
        submodules: TransformerLayerSubmodules | None = None,
        layer_number: int = 1,
        hidden_dropout: float | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
        **kwargs,
    ) -> None:
        """kwargs: further TransformerLayer arguments of newer megatron-core versions."""
        _check_config(config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        number = layer_number
        if not kwargs.get("is_mtp_layer", False) and kwargs.get("add_layer_offset", True):
            number += get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))
        spec = get_asa_layer_spec(
            config, config.layer_kind(number), moe=is_moe_layer(config, number)
        )
        super().__init__(
            config, spec.submodules, layer_number, hidden_dropout, pg_collection, vp_stage, **kwargs
        )


asa_layer_spec = ModuleSpec(module=ASATransformerLayer)
"""Single layer spec for every ASA layer: `--spec megatron_nsa.specs asa_layer_spec`."""
