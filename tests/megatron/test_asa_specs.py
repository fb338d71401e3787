"""Layer and block specs: kinds by global layer number per (virtual) pipeline stage, MoE, and
the validation done before any module is built."""

import megatron.core
import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_nsa import ASATransformerConfig, get_asa_decoder_block_spec, get_asa_layer_spec
from megatron_nsa.attention import (
    DenseSelfAttention,
    GlobalSelfAttention,
    LocalSelfAttention,
    NSASelfAttention,
)
from megatron_nsa.compat import have_transformer_engine
from megatron_nsa.specs import stage_layer_numbers

KIND_OF = {
    LocalSelfAttention: "L",
    GlobalSelfAttention: "G",
    DenseSelfAttention: "D",
    NSASelfAttention: "N",
}
TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_head_dim=16,
    qk_pos_emb_head_dim=8,
    v_head_dim=16,
    use_cpu_initialization=True,
    pipeline_dtype=torch.float32,
)


def make(**overrides) -> ASATransformerConfig:
    return ASATransformerConfig(**{**TINY, "num_layers": 4, **overrides})


def kinds(block) -> str:
    return "".join(KIND_OF[spec.submodules.self_attention.module] for spec in block.layer_specs)


def test_pipeline_stages_get_the_kinds_of_their_global_layer_numbers():
    config = make(num_layers=6, attention_pattern="LLG", pipeline_model_parallel_size=2)
    assert stage_layer_numbers(config, pp_rank=0) == [1, 2, 3]
    assert stage_layer_numbers(config, pp_rank=1) == [4, 5, 6]
    assert kinds(get_asa_decoder_block_spec(config, False, pp_rank=0)) == "LLG"
    assert kinds(get_asa_decoder_block_spec(config, False, pp_rank=1)) == "LLG"


def test_uneven_pipeline_layouts_get_the_kinds_of_their_global_layer_numbers():
    config = make(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ettt|tL")
    assert kinds(get_asa_decoder_block_spec(config, False, pp_rank=0)) == "LGL"
    assert kinds(get_asa_decoder_block_spec(config, False, pp_rank=1)) == "G"


def test_virtual_pipeline_stages_get_the_kinds_of_their_global_layer_numbers():
    config = make(
        num_layers=8,
        attention_pattern="LGDN",
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=2,
    )
    # Interleaved layout: (pp_rank, vp_stage) holds layers vp * 4 + pp * 2 + (1, 2).
    expected = {
        (0, 0): ([1, 2], "LG"),
        (1, 0): ([3, 4], "DN"),
        (0, 1): ([5, 6], "LG"),
        (1, 1): ([7, 8], "DN"),
    }
    for (pp_rank, vp_stage), (numbers, pattern) in expected.items():
        assert stage_layer_numbers(config, vp_stage, pp_rank) == numbers
        block = get_asa_decoder_block_spec(config, False, vp_stage, pp_rank=pp_rank)
        assert kinds(block) == pattern


def test_moe_layers_follow_moe_layer_freq():
    config = make(num_moe_experts=4, moe_layer_freq=[1, 0, 0, 1], moe_ffn_hidden_size=32)
    block = get_asa_decoder_block_spec(config, False, pp_rank=0)
    # A ModuleSpec on megatron-core 0.16, a functools.partial on 0.19.
    mlps = [spec.submodules.mlp for spec in block.layer_specs]
    built = [getattr(mlp, "module", getattr(mlp, "func", None)) for mlp in mlps]
    assert [module is MoELayer for module in built] == [True, False, False, True]


def test_single_layer_spec_of_each_kind():
    config = make(attention_pattern="LGDN")
    for kind in "LGDN":
        spec = get_asa_layer_spec(config, kind, use_transformer_engine=False)
        assert KIND_OF[spec.submodules.self_attention.module] == kind
    with pytest.raises(ValueError, match="layer_kind='X'"):
        get_asa_layer_spec(config, "X", use_transformer_engine=False)


def test_context_parallel_specs_are_the_same_layers():
    """CP is handled inside the attention modules: the specs do not change with it."""
    plain = get_asa_decoder_block_spec(make(), False, pp_rank=0)
    split = get_asa_decoder_block_spec(make(context_parallel_size=2), False, pp_rank=0)
    assert [spec.submodules.self_attention.module for spec in split.layer_specs] == [
        spec.submodules.self_attention.module for spec in plain.layer_specs
    ]


def test_sequence_parallel_needs_a_norm_that_supports_it():
    config = make(tensor_model_parallel_size=2, sequence_parallel=True)
    get_asa_layer_spec(config, "L", use_transformer_engine=False)
    with pytest.raises(ValueError, match="WrappedTorchNorm does not support sequence parallel"):
        get_asa_layer_spec(config, "L", use_transformer_engine=False, norm=WrappedTorchNorm)


@pytest.mark.skipif(have_transformer_engine(), reason="transformer_engine is installed")
def test_transformer_engine_backend_needs_transformer_engine():
    with pytest.raises(ImportError, match="transformer_engine cannot be imported"):
        get_asa_layer_spec(make(), "L", use_transformer_engine=True)
    spec = get_asa_layer_spec(make(), "L")  # auto: falls back to the local backend
    assert spec.submodules.self_attention.module is LocalSelfAttention


def test_unsupported_megatron_core_version_is_refused(monkeypatch):
    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    with pytest.raises(RuntimeError, match=r"megatron-core >= 0.16, < 0.20; found 0.20.0"):
        get_asa_layer_spec(make(), "L", use_transformer_engine=False)


def test_specs_need_the_asa_config():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    config = MLATransformerConfig(num_layers=2, **{k: v for k, v in TINY.items()})
    with pytest.raises(TypeError, match="ASATransformerConfig"):
        get_asa_layer_spec(config, "L", use_transformer_engine=False)
