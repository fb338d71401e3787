"""Two CPU processes with gloo: tensor, sequence and pipeline parallelism give the per-token
losses and gradients of one rank, and the attention modules refuse layouts they cannot
split, at construction.

Each comparison runs the same batch through a TP=1 model (data parallel over both ranks),
then through the parallel layout loaded with the same weights; gradients are gathered into
full tensors through the sharded state dict, which checks its TP axes at the same time.
"""

from __future__ import annotations

import pytest
import torch
from cpu_support import run_checks
from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from tiny_gpt import (
    batch,
    build_model,
    compare_with_one_rank,
    forward_backward,
    full_tensors,
    init_parallel,
    last_stage_output,
    load_full,
    tiny_config,
    train,
    unwrap,
)

from megatron_nsa import asa_layer_spec, get_asa_layer_spec


def tp2_splits_latent_heads(rank, world_size):
    compare_with_one_rank({}, tp=2)
    compare_with_one_rank({"compressor": "mean", "selection_query_block": 4}, tp=2)


def tp2_sequence_parallel(rank, world_size):
    compare_with_one_rank({}, tp=2, sequence_parallel=True)


def tp2_replicates_a_single_latent_head(rank, world_size):
    compare_with_one_rank({"global_num_latent_heads": 1}, tp=2)
    compare_with_one_rank(
        {"global_num_latent_heads": 1, "q_lora_rank": 24}, tp=2, sequence_parallel=True
    )


def tp2_dense_and_nsa_layers(rank, world_size):
    compare_with_one_rank(
        {"attention_pattern": "DN", "num_query_groups": 2}, tp=2, sequence_parallel=True
    )


def tp2_pp2_layers_of_one_kind(rank, world_size):
    """Every layer global: Megatron stacks the layers' weights along a prepended layer axis in
    the sharded state dict, which the layouts split over TP and PP ranks."""
    compare_with_one_rank({"attention_pattern": "G"}, tp=2)
    compare_with_one_rank({"attention_pattern": "G"}, pp=2)


def pp2_matches_one_stage(rank, world_size):
    compare_with_one_rank({"attention_pattern": "LGDN", "num_query_groups": 2}, pp=2)


def one_layer_spec_builds_every_kind(rank, world_size):
    """`asa_layer_spec` (Megatron-LM's --spec) picks each layer's kind from its global number."""
    config = tiny_config(pp=2, attention_pattern="LGDN", num_query_groups=2)
    init_parallel(config)
    block_model = build_model(config)
    spec_model = build_model(config, layer_spec=asa_layer_spec)
    for ours, theirs in zip(
        unwrap(block_model[0]).decoder.layers, unwrap(spec_model[0]).decoder.layers, strict=True
    ):
        assert ours.layer_number == theirs.layer_number
        assert type(ours.self_attention) is type(theirs.self_attention)
    load_full(spec_model, full_tensors(block_model))
    data = {key: value for key, value in batch().items() if key != "labels"}
    torch.testing.assert_close(
        last_stage_output(forward_backward(spec_model, data, forward_only=True)),
        last_stage_output(forward_backward(block_model, data, forward_only=True)),
        atol=1e-5,
        rtol=1e-5,
    )


def optimizer_steps_match_one_rank(rank, world_size):
    """Gradient norm (each replicated latent counted once) and updates match TP=1."""
    overrides = {"global_num_latent_heads": 1}
    reference = tiny_config(**overrides)
    init_parallel(reference)
    weights = full_tensors(build_model(reference))
    expected = train(reference, steps=3, weights=weights)
    config = tiny_config(tp=2, sequence_parallel=True, **overrides)
    init_parallel(config)
    actual = train(config, steps=3, weights=weights)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def build_attention(config, kind: str, **replace):
    spec = get_asa_layer_spec(config, kind, use_transformer_engine=False)
    attention = spec.submodules.self_attention
    for name, value in replace.items():
        setattr(attention.submodules, name, value)
    return build_module(attention, config=config, layer_number=1)


def expect_error(error: type, match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def attention_refuses_layouts_it_cannot_split(rank, world_size):
    config = tiny_config(tp=2, sequence_parallel=True)
    init_parallel(config)
    expect_error(
        ValueError, "kv_layernorm is WrappedTorchNorm, which does not support sequence",
        build_attention, config, "L", kv_layernorm=WrappedTorchNorm,
    )
    # Layouts the config did not announce: parallel_state has TP=2, the configs say TP=1.
    expect_error(
        ValueError, "num_attention_heads=3 must be a multiple of the tensor parallel size 2",
        build_attention, tiny_config(attention_pattern="L", num_attention_heads=3), "L",
    )
    six_heads = tiny_config(attention_pattern="G", num_attention_heads=6, global_num_latent_heads=3)
    expect_error(
        ValueError, "global_num_latent_heads: 3 heads cannot be split over",
        build_attention, six_heads, "G",
    )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=2)
    for kind in "LGDN":
        expect_error(
            ValueError, "context-parallel group has 2 ranks but config.context_parallel_size=1",
            build_attention, tiny_config(attention_pattern=kind, num_query_groups=2), kind,
        )


CHECKS = [
    tp2_splits_latent_heads,
    tp2_sequence_parallel,
    tp2_replicates_a_single_latent_head,
    tp2_dense_and_nsa_layers,
    tp2_pp2_layers_of_one_kind,
    pp2_matches_one_stage,
    one_layer_spec_builds_every_kind,
    optimizer_steps_match_one_rank,
    attention_refuses_layouts_it_cannot_split,
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(CHECKS, 2, str(tmp_path_factory.mktemp("two_ranks") / "results.pt"))


@pytest.mark.parametrize("check", [check.__name__ for check in CHECKS])
def test_two_ranks(results, check):
    assert results[check] is None, results[check]
