"""One CPU process with gloo: the tiny ASA GPTModel trains with Megatron's DDP and
optimizer, every layer kind builds and trains, and recompute / packed sequences / bf16 /
deterministic_mode give what they should."""

from __future__ import annotations

import pytest
import torch
from cpu_support import run_checks
from megatron.core.packed_seq_params import PackedSeqParams
from tiny_gpt import (
    SEQ,
    batch,
    build_model,
    forward_backward,
    full_tensors,
    grads,
    init_parallel,
    load_full,
    tiny_config,
    train,
)


def trains_lg_model(rank, world_size):
    config = tiny_config()
    init_parallel(config)
    losses, _ = train(config, steps=10, distributed_optimizer=True)
    assert losses[-1] < 0.8 * losses[0], losses


def trains_dense_and_nsa_models(rank, world_size):
    for pattern in ("D", "N"):
        config = tiny_config(attention_pattern=pattern, num_query_groups=2)
        init_parallel(config)
        losses, _ = train(config, steps=8, distributed_optimizer=False)
        assert losses[-1] < 0.8 * losses[0], (pattern, losses)


def trains_with_moe_layers(rank, world_size):
    config = tiny_config(
        num_moe_experts=4, moe_layer_freq=[0, 1, 0, 1], moe_ffn_hidden_size=64, moe_router_topk=2
    )
    init_parallel(config)
    losses, _ = train(config, steps=8, distributed_optimizer=True)
    assert losses[-1] < 0.8 * losses[0], losses


def trains_in_bf16(rank, world_size):
    config = tiny_config(bf16=True, params_dtype=torch.bfloat16, q_lora_rank=24)
    init_parallel(config)
    losses, _ = train(config, steps=8, distributed_optimizer=True)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.8 * losses[0], losses


def yarn_rope_trains(rank, world_size):
    config = tiny_config(rope_type="yarn", rotary_scaling_factor=4.0, mscale_all_dim=1.0)
    init_parallel(config)
    losses, _ = train(config, steps=4, distributed_optimizer=False)
    assert losses[-1] < losses[0], losses


def recompute_gives_the_same_loss_and_gradients(rank, world_size):
    from megatron.core.distributed import DistributedDataParallelConfig

    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    variants = {
        "none": {},
        "full": dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        ),
        "selective": dict(
            recompute_granularity="selective",
            recompute_modules=["core_attn", "mla_up_proj"],
        ),
        "selective mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    }
    results = {}
    for name, overrides in variants.items():
        config = tiny_config(attention_pattern="LGDN", num_query_groups=2, **overrides)
        init_parallel(config)
        chunks = build_model(config, ddp)
        if name == "none":
            weights = full_tensors(chunks)
        load_full(chunks, weights)
        loss = forward_backward(chunks, batch())
        results[name] = (loss, full_tensors(chunks, grads))
    loss, gradients = results.pop("none")
    for name, (other_loss, other_grads) in results.items():
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-5, msg=name)
        for key, value in gradients.items():
            torch.testing.assert_close(other_grads[key], value, atol=1e-6, rtol=1e-5, msg=key)


def packed_sequences_attend_within_documents(rank, world_size):
    """A THD batch of two documents gives each document's own logits (all four kinds)."""
    config = tiny_config(attention_pattern="LGDN", num_query_groups=2)
    init_parallel(config)
    chunks = build_model(config)
    for chunk in chunks:
        chunk.eval()
    lengths = (40, SEQ - 40)
    tokens = torch.randint(0, 64, (1, SEQ), generator=torch.Generator().manual_seed(3))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0, lengths[0], SEQ], dtype=torch.int32)
    packed = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )
    logits = forward_backward(
        chunks, {"tokens": tokens, "position_ids": positions}, True, packed_seq_params=packed
    )
    start = 0
    for n in lengths:
        piece = slice(start, start + n)
        alone = forward_backward(
            chunks, {"tokens": tokens[:, piece], "position_ids": positions[:, piece]}, True
        )
        torch.testing.assert_close(logits[:, piece], alone, atol=2e-5, rtol=1e-4)
        start += n


def deterministic_mode_keeps_the_kernels_free_of_atomics(rank, world_size):
    """Megatron's deterministic_mode reaches the Triton kernels through the global layer: with
    the key-major (fp32 atomics) forward made to fail, a deterministic model still gives the
    reference backend's loss and gradients, while the same model without deterministic_mode
    reaches the key-major forward."""
    from nsa_kernels.selected_attention import triton_op

    def key_major_forward(*args, **kwargs):
        raise RuntimeError("the key-major forward ran")

    key_major = triton_op.attention_forward_key_major
    triton_op.attention_forward_key_major = key_major_forward
    try:
        results = {}
        for name, overrides in {
            "reference": {},
            "triton": dict(nsa_backend="triton", deterministic_mode=True),
        }.items():
            config = tiny_config(num_layers=2, **overrides)
            init_parallel(config)
            chunks = build_model(config)
            if name == "reference":
                weights = full_tensors(chunks)
            load_full(chunks, weights)
            loss = forward_backward(chunks, batch())
            results[name] = (loss, full_tensors(chunks, grads))
        loss, gradients = results["reference"]
        other_loss, other_grads = results["triton"]
        torch.testing.assert_close(other_loss, loss, atol=1e-5, rtol=1e-4)
        for key, value in gradients.items():
            torch.testing.assert_close(other_grads[key], value, atol=1e-5, rtol=1e-4, msg=key)
        config = tiny_config(num_layers=2, nsa_backend="triton")
        init_parallel(config)
        chunks = build_model(config)
        load_full(chunks, weights)
        with pytest.raises(RuntimeError, match="the key-major forward ran"):
            forward_backward(chunks, batch())
    finally:
        triton_op.attention_forward_key_major = key_major


CHECKS = [
    trains_lg_model,
    trains_dense_and_nsa_models,
    trains_with_moe_layers,
    trains_in_bf16,
    yarn_rope_trains,
    recompute_gives_the_same_loss_and_gradients,
    packed_sequences_attend_within_documents,
    deterministic_mode_keeps_the_kernels_free_of_atomics,
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(CHECKS, 1, str(tmp_path_factory.mktemp("single") / "results.pt"))


@pytest.mark.parametrize("check", [check.__name__ for check in CHECKS])
def test_single_rank(results, check):
    assert results[check] is None, results[check]
