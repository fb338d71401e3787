"""ASATransformerConfig fields that the Megatron integration adds or forces."""

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


def make(**overrides) -> ASATransformerConfig:
    return ASATransformerConfig(**{**TINY, **overrides})


def test_rope_is_applied_by_the_asa_layers_not_by_gptmodel():
    # Megatron-LM's argument translation passes multi_latent_attention=False and rope_type=None.
    config = make(multi_latent_attention=False, rope_type=None)
    assert config.multi_latent_attention and config.rope_type == "rope"


@pytest.mark.parametrize(
    "pattern, num_layers, per_layer_keys",
    [("LG", 4, True), ("LLG", 2, False), ("L", 4, False), ("DN", 2, True)],
)
def test_checkpoints_use_per_layer_keys_when_kinds_differ(pattern, num_layers, per_layer_keys):
    config = make(attention_pattern=pattern, num_layers=num_layers)
    assert config.hetereogenous_dist_checkpoint is per_layer_keys


def test_attention_dropout_is_rejected():
    assert make().attention_dropout == 0.0
    with pytest.raises(ValueError, match=r"attention_dropout=0.1 is invalid: .*no dropout"):
        make(attention_dropout=0.1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tensor_model_parallel_size=3), r"num_attention_heads=4 is invalid: must be a mult"),
        (
            dict(global_num_latent_heads=4, num_attention_heads=12, tensor_model_parallel_size=3),
            r"global_num_latent_heads=4 is invalid: must be a multiple or a divisor",
        ),
        (
            dict(attention_pattern="D", num_query_groups=1, tensor_model_parallel_size=2),
            r"num_query_groups=1 is invalid: .*tensor_model_parallel_size=2",
        ),
        (dict(attention_pattern="N", num_query_groups=3), r"num_query_groups=3 is invalid"),
    ],
)
def test_tensor_parallel_splits_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_megatron_lm_options_map_to_config_fields():
    import argparse
    import dataclasses

    from megatron_nsa.megatron_lm import ASA_FIELDS, add_asa_args

    parser = add_asa_args(argparse.ArgumentParser())
    args = parser.parse_args(["--attention-pattern", "LLG", "--select-top-n", "8"])
    # What Megatron-LM's core_transformer_config_from_args does with a config class.
    names = {field.name for field in dataclasses.fields(ASATransformerConfig)}
    assert set(ASA_FIELDS) <= names
    config = make(**{k: v for k, v in vars(args).items() if k in names})
    assert (config.attention_pattern, config.select_top_n) == ("LLG", 8)
    assert config.compress_mlp_hidden_size is None
