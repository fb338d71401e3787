"""ASATransformerConfig: defaults, layer kinds, and one test per rejected value."""

import pytest

from megatron_nsa import ASATransformerConfig

TINY = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_head_dim=16,
    qk_pos_emb_head_dim=8,
    v_head_dim=16,
)


def make(**overrides):
    return ASATransformerConfig(**{**TINY, **overrides})


def test_defaults_follow_nsa_and_plain_rope():
    config = make()
    assert config.attention_pattern == "LG"
    assert (config.compress_block_size, config.compress_stride) == (32, 16)
    assert (config.select_block_size, config.select_top_n) == (64, 16)
    assert config.sliding_window_size == 512
    assert config.rope_type == "rope" and config.rotary_scaling_factor == 1.0
    assert config.multi_latent_attention


def test_layer_kind_repeats_the_pattern_by_global_layer_number():
    config = make(num_layers=6, attention_pattern="LLG")
    assert [config.layer_kind(n) for n in range(1, 7)] == list("LLGLLG")
    with pytest.raises(ValueError, match="layer_number=0"):
        config.layer_kind(0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention_pattern="LX"), r"attention_pattern='LX' is invalid: .*L, G, D, N"),
        (dict(attention_pattern=""), r"attention_pattern='' is invalid"),
        (dict(sliding_window_size=0), r"sliding_window_size=0 is invalid: must be a positive"),
        (dict(compress_block_size=-4), r"compress_block_size=-4 is invalid"),
        (dict(compress_stride=0), r"compress_stride=0 is invalid"),
        (dict(compress_stride=12), r"compress_stride=12 is invalid: must divide compress_block"),
        (
            dict(compress_block_size=32, compress_stride=32, select_block_size=48),
            r"compress_stride=32 is invalid: must divide select_block_size=48",
        ),
        (
            dict(compress_block_size=128, select_block_size=64),
            r"compress_block_size=128 is invalid: must be <= select_block_size=64",
        ),
        (dict(select_top_n=2), r"select_top_n=2 is invalid: must be >= 3"),
        (
            dict(selection_query_block=3),
            r"selection_query_block=3 is invalid: must divide select_block_size=64",
        ),
        (dict(global_num_latent_heads=0), r"global_num_latent_heads=0 is invalid"),
        (
            dict(global_num_latent_heads=3),
            r"global_num_latent_heads=3 is invalid: must divide num_attention_heads=4",
        ),
        (dict(global_kv_lora_rank=0), r"global_kv_lora_rank=0 is invalid"),
        (dict(compressor="max"), r"compressor='max' is invalid: allowed: mlp, mean"),
        (dict(compress_mlp_hidden_size=0), r"compress_mlp_hidden_size=0 is invalid"),
        (dict(nsa_backend="cuda"), r"nsa_backend='cuda' is invalid: allowed: auto"),
        (
            dict(tensor_model_parallel_size=3),
            r"num_attention_heads=4 is invalid: must be a multiple of tensor_model_parallel_size=3",
        ),
        (
            dict(num_attention_heads=12, global_num_latent_heads=3, tensor_model_parallel_size=2),
            r"global_num_latent_heads=3 is invalid: must be a multiple or a divisor of "
            r"tensor_model_parallel_size=2",
        ),
        (
            dict(qk_head_dim=256, qk_pos_emb_head_dim=64),
            r"qk_head_dim=256 is invalid: .* = 320 exceeds the kernels' limit of 256",
        ),
        (dict(v_head_dim=512), r"v_head_dim=512 is invalid: must be <= 256"),
        (dict(qk_pos_emb_head_dim=7), r"qk_pos_emb_head_dim=7 is invalid: must be even"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_latent_heads_may_be_replicated_when_tp_exceeds_them():
    config = make(global_num_latent_heads=1, tensor_model_parallel_size=2)
    assert config.global_num_latent_heads == 1


def test_latent_heads_are_not_checked_without_global_layers():
    config = make(attention_pattern="L", global_num_latent_heads=3)
    assert config.layer_kind(1) == "L"
