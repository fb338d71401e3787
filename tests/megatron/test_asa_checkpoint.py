"""Four CPU processes with gloo: dist_checkpointing saved at TP=2/PP=2 loads at TP=1/PP=1
(and back) with identical logits; latent heads replicated in two groups (TP=4, h_c=2) and
virtual pipeline stages give the losses and gradients of one rank, with every layer of the
kind its global number says."""

from __future__ import annotations

import tempfile

import pytest
import torch
from cpu_support import run_checks
from megatron.core import dist_checkpointing
from tiny_gpt import (
    batch,
    build_model,
    compare_with_one_rank,
    forward_backward,
    init_parallel,
    last_stage_output,
    tiny_config,
    unwrap,
)

from megatron_nsa.attention import GlobalSelfAttention, LocalSelfAttention

KIND_OF = {LocalSelfAttention: "L", GlobalSelfAttention: "G"}


def shared_directory() -> str:
    """An empty directory that every rank sees, created by rank 0."""
    path = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(path, src=0)
    return path[0]


def logits(chunks) -> torch.Tensor:
    data = {key: value for key, value in batch().items() if key != "labels"}
    return last_stage_output(forward_backward(chunks, data, forward_only=True))


def save(chunks) -> str:
    directory = shared_directory()
    dist_checkpointing.save(unwrap(chunks[0]).sharded_state_dict(), directory)
    return directory


def load(chunks, directory: str) -> None:
    model = unwrap(chunks[0])
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))


def checkpoint_moves_between_layouts(rank, world_size):
    # One latent head, replicated on both TP ranks: exactly one replica must write it.
    overrides = {"global_num_latent_heads": 1, "q_lora_rank": 24}
    split = tiny_config(tp=2, pp=2, **overrides)
    init_parallel(split, seed=1)
    chunks = build_model(split)
    saved_logits, directory = logits(chunks), save(chunks)

    whole = tiny_config(**overrides)
    init_parallel(whole, seed=2)
    chunks = build_model(whole)
    load(chunks, directory)
    torch.testing.assert_close(logits(chunks), saved_logits, atol=1e-5, rtol=1e-5)

    with torch.no_grad():  # new weights, so that loading them back is visible
        for param in unwrap(chunks[0]).parameters():
            param.mul_(1.1)
    saved_logits, directory = logits(chunks), save(chunks)
    init_parallel(split, seed=3)
    chunks = build_model(split)
    load(chunks, directory)
    torch.testing.assert_close(logits(chunks), saved_logits, atol=1e-5, rtol=1e-5)


def tp4_replicates_two_latent_heads(rank, world_size):
    compare_with_one_rank({"global_num_latent_heads": 2}, tp=4, sequence_parallel=True)


def virtual_pipeline_stages(rank, world_size):
    overrides = {"num_layers": 8}
    config = tiny_config(pp=2, vpp=2, **overrides)
    init_parallel(config)
    built = []
    for chunk in build_model(config):
        for layer in unwrap(chunk).decoder.layers:
            kind = KIND_OF[type(layer.self_attention)]
            assert kind == config.layer_kind(layer.layer_number), (layer.layer_number, kind)
            built.append(layer.layer_number)
    everyone = [None] * world_size
    torch.distributed.all_gather_object(everyone, built)
    assert sorted(set(sum(everyone, []))) == list(range(1, 9)), everyone
    compare_with_one_rank(overrides, pp=2, vpp=2)


CHECKS = [
    checkpoint_moves_between_layouts,
    tp4_replicates_two_latent_heads,
    virtual_pipeline_stages,
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(CHECKS, 4, str(tmp_path_factory.mktemp("four_ranks") / "results.pt"))


@pytest.mark.parametrize("check", [check.__name__ for check in CHECKS])
def test_four_ranks(results, check):
    assert results[check] is None, results[check]
