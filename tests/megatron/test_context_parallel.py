"""Context parallelism on CPU processes with gloo: per-token losses and every parameter
gradient of a real GPTModel under CP (and TP x CP) equal one rank's, the bytes each rank
sends match the formulas of docs/context_parallel.md, and bad layouts fail before any
communication with errors that name the numbers.

The batch is split as Megatron does (`get_batch_on_this_cp_rank`, or the same split per
packed document); gradients are compared after Megatron's DDP reduction over the data and
context parallel ranks (`finalize_model_grads`). T = 96 tokens: with CP=2 the chunks (24)
are longer than the window's halo (w - 1 = 15), with CP=4 (12) shorter, so halos come from
two chunks and two ranks.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from cpu_support import run_checks
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.packed_seq_params import PackedSeqParams
from tiny_gpt import (
    BATCH,
    SEQ,
    assert_close_dicts,
    batch,
    build_model,
    forward_backward,
    full_tensors,
    grads,
    init_parallel,
    load_full,
    tiny_config,
)

from megatron_nsa.compat import get_batch_on_this_cp_rank
from megatron_nsa.context_parallel import (
    ContextParallelLayout,
    bytes_sent,
    comm_timer,
    start_gather,
    start_halos,
)

# Pattern "LG" with l=8, s=4, l'=16, n=3 (the issue's model), window 16.
ASA = {"attention_pattern": "LG", "select_top_n": 3}
DDP = DistributedDataParallelConfig(grad_reduce_in_fp32=True)


def global_losses(local: torch.Tensor, indices: torch.Tensor, length: int) -> torch.Tensor:
    """[b, s_local] per-token losses of every rank -> [b, length] in global order."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (indices, local))
    full = torch.full((local.shape[0], length), float("nan"))
    for rank_indices, rank_losses in gathered:
        full[:, rank_indices] = rank_losses
    assert not torch.isnan(full).any()
    return full


def one_rank_run(overrides: dict, data: dict, packed: PackedSeqParams | None = None):
    """(weights, per-token loss, gradients) of the CP=1 model (data parallel over all ranks,
    every rank with the whole batch)."""
    config = tiny_config(**overrides)
    init_parallel(config)
    chunks = build_model(config, DDP)
    weights = full_tensors(chunks)
    loss = forward_backward(chunks, data, packed_seq_params=packed)
    return weights, loss, full_tensors(chunks, grads)


def cp_run(overrides: dict, cp: int, weights: dict, data: dict, tp: int = 1,
           packed: PackedSeqParams | None = None, **parallel):
    """(per-token loss in global order, gradients) of the same weights under CP (x TP)."""
    config = tiny_config(tp=tp, context_parallel_size=cp, **parallel, **overrides)
    init_parallel(config)
    chunks = build_model(config, DDP)
    load_full(chunks, weights)
    group = parallel_state.get_context_parallel_group()
    length = data["tokens"].shape[1]
    cu_seqlens = None if packed is None else packed.cu_seqlens_q_padded
    layout = ContextParallelLayout.of_rank(cp, group.rank(), length, cu_seqlens)
    if packed is None:
        local = get_batch_on_this_cp_rank(dict(data, index=torch.arange(length)[None]), group)
        indices = local.pop("index")[0]
        assert torch.equal(indices, layout.local_indices())
    else:
        indices = layout.local_indices()
        local = {key: value[:, indices] for key, value in data.items()}
    bytes_sent.clear()
    loss = forward_backward(chunks, local, packed_seq_params=packed)
    return global_losses(loss, indices, length), full_tensors(chunks, grads)


def compare(overrides: dict, cp: int, tp: int = 1, data: dict | None = None,
            packed: PackedSeqParams | None = None, **parallel) -> None:
    """Per-token loss and all gradients under CP equal the CP=1 run's to 1e-5 (fp32)."""
    data = batch() if data is None else data
    weights, expected_loss, expected_grads = one_rank_run(overrides, data, packed)
    loss, got_grads = cp_run(overrides, cp, weights, data, tp, packed, **parallel)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert_close_dicts(got_grads, expected_grads, atol=1e-5)


def owner(cp: int, length: int, token: int) -> int:
    """The rank holding global token `token`: chunk k = token // C is rank k for k < P,
    else rank 2P-1-k."""
    k = token // (length // (2 * cp))
    return k if k < cp else 2 * cp - 1 - k


def halo_tokens_sent(cp: int, rank: int, length: int, halo: int) -> int:
    """Tokens `rank` sends in one direction of a halo exchange, counted token by token."""
    chunk = length // (2 * cp)
    return sum(
        owner(cp, length, token) == rank
        for dst in range(cp) if dst != rank
        for k in (dst, 2 * cp - 1 - dst)
        for token in range(max(0, k * chunk - halo), k * chunk)
    )


def compressed_rows(cp: int, length: int, block: int, stride: int) -> int:
    """The most compression blocks one rank owns, a block belonging to the rank that holds
    its last token."""
    counts = Counter(
        owner(cp, length, i * stride + block - 1) for i in range((length - block) // stride + 1)
    )
    return max(counts.values())


def check_bytes(cp: int, tp: int = 1) -> None:
    """bytes_sent after one forward + backward of the last `cp_run` equals the formulas."""
    config = tiny_config(tp=tp, context_parallel_size=cp, **ASA)
    rank = parallel_state.get_context_parallel_rank()
    halo, local = config.sliding_window_size - 1, SEQ // cp
    # Local layers (1, 3): [c ; k^R] of the halo tokens, both directions, fp32.
    tokens = halo_tokens_sent(cp, rank, SEQ, halo)
    if local // 2 >= halo:  # chunks cover the halo: one halo per neighbouring chunk
        assert tokens == halo * ((rank < cp - 1) + (rank > 0))
        assert tokens == halo_tokens_sent(cp, rank, 4 * SEQ, halo)  # independent of T
    halo_bytes = tokens * BATCH * (config.kv_lora_rank + config.qk_pos_emb_head_dim) * 4
    # Global layers (2, 4): h_c / TP latent heads + k^R per token: all-gathered, and the
    # l - 1 tokens before each chunk for its compression blocks; then the compressed tokens
    # (d_c' + d_R per latent head) all-gathered, padded to the rank owning the most blocks.
    heads = config.global_num_latent_heads // tp
    width = heads * config.global_kv_lora_rank + config.qk_pos_emb_head_dim
    gather = (cp - 1) * local * BATCH * width * 4
    block, stride = config.compress_block_size, config.compress_stride
    cmp_halo = halo_tokens_sent(cp, rank, SEQ, block - 1) * BATCH * width * 4
    rows = compressed_rows(cp, SEQ, block, stride)
    compressed = (cp - 1) * rows * BATCH * heads * (
        config.global_kv_lora_rank + config.qk_pos_emb_head_dim
    ) * 4
    expected = {}
    for phase in ("forward", "backward"):
        for layer in (1, 3):
            expected[(layer, "halo", phase)] = halo_bytes
        for layer in (2, 4):
            expected[(layer, "latent", phase)] = gather
            expected[(layer, "compress_halo", phase)] = cmp_halo
            expected[(layer, "compressed", phase)] = compressed
    assert dict(bytes_sent) == expected, (dict(bytes_sent), expected)


def packed_batch(lengths: list[int]) -> tuple[dict, PackedSeqParams]:
    """One row of packed documents (each a multiple of 2P) and its PackedSeqParams."""
    data = batch()
    total = sum(lengths)
    packed = {key: value[:1, :total] for key, value in data.items()}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths),
    )
    return packed, params


# --- two ranks -----------------------------------------------------------------------------


def cp2_local_and_global_layers(rank, world_size):
    compare(ASA, cp=2)
    check_bytes(cp=2)


def cp2_halo_spans_several_chunks(rank, world_size):
    """w - 1 = 39 > chunk 24: chunk 3's halo comes from chunks 2 (local) and 1 (rank 1)."""
    compare({**ASA, "sliding_window_size": 40, "selection_query_block": 4,
             "compressor": "mean"}, cp=2)


def cp2_dense_and_nsa_layers(rank, world_size):
    compare({"attention_pattern": "DN", "num_query_groups": 2, "select_top_n": 3}, cp=2)
    # Both all-gather per-KV-head K and V: 2 groups x 2 x kv_channels (16) values per token.
    gather = (2 - 1) * (SEQ // 2) * BATCH * 2 * 2 * 16 * 4
    expected = {
        (layer, "kv", phase): gather for layer in (1, 2, 3, 4) for phase in ("forward", "backward")
    }
    assert dict(bytes_sent) == expected, (dict(bytes_sent), expected)


def cp2_packed_documents(rank, world_size):
    data, packed = packed_batch([40, 16, 40])
    compare({**ASA, "attention_pattern": "LGDN", "num_query_groups": 2}, cp=2, data=data,
            packed=packed)


def cp2_triton_kernels_with_recompute(rank, world_size):
    """The Triton kernels (interpreted) at chunk offsets, with the attention recomputed in
    the backward (the exchanges stay outside the recomputed region)."""
    data = {key: value[:1, :64] for key, value in batch().items()}  # interpreting is slow
    compare({**ASA, "nsa_backend": "triton", "recompute_granularity": "selective",
             "recompute_modules": ["core_attn", "mla_up_proj"]}, cp=2, data=data)


def cp2_full_layer_recompute(rank, world_size):
    """Whole layers recomputed: the exchanges run again in the backward."""
    compare({**ASA, "recompute_granularity": "full", "recompute_method": "uniform",
             "recompute_num_layers": 1}, cp=2)


def cp2_bad_inputs_fail_before_communication(rank, world_size):
    config = tiny_config(context_parallel_size=2, **ASA)
    init_parallel(config)
    chunks = build_model(config)
    bytes_sent.clear()
    local = {key: value[:, :23] for key, value in batch().items()}  # not 2 chunks
    with pytest.raises(ValueError, match=r"4 equal chunks, but this rank holds 23 tokens"):
        forward_backward(chunks, local, forward_only=True)
    data, packed = packed_batch([42, 54])
    local = {key: value[:, :48] for key, value in data.items()}
    with pytest.raises(ValueError, match=r"document\(s\) \[\(0, 42\), \(1, 54\)\]"):
        forward_backward(chunks, local, forward_only=True, packed_seq_params=packed)
    blocks = tiny_config(context_parallel_size=2, selection_query_block=8, **ASA)
    init_parallel(blocks)
    chunks = build_model(blocks)
    local = get_batch_on_this_cp_rank({key: value[:, :40] for key, value in batch().items()})
    message = r"selection_query_block=8 must divide .* chunks of \[10\] tokens"
    with pytest.raises(ValueError, match=message):
        forward_backward(chunks, local, forward_only=True)
    assert sum(bytes_sent.values()) == 0
    # A CP group that is not the one the config describes.
    with pytest.raises(ValueError, match="context-parallel group has 2 ranks but config"):
        build_model(tiny_config(**ASA))


def cp2_exchanges_are_asynchronous_and_timed(rank, world_size):
    """An all-gather and a halo exchange return with their work in flight (the caller
    computes meanwhile) and deliver the right tokens and gradients once waited for; with
    the comm timer on, each is waited for where it starts and timed, forward and backward."""
    init_parallel(tiny_config(context_parallel_size=2, **ASA))
    group = parallel_state.get_context_parallel_group()
    layouts = [ContextParallelLayout.of_rank(2, r, SEQ) for r in range(2)]
    layout, halo = layouts[rank], 30  # longer than a chunk (24): halos span two chunks

    def values(positions: torch.Tensor) -> torch.Tensor:  # [n] -> [n, 3], one row per token
        return positions[:, None].double() * torch.tensor([1.0, -2.0, 0.5], dtype=torch.double)

    def run(timed: bool):
        x = values(layout.local_indices()).requires_grad_()
        if timed:
            comm_timer.start()
        gather = start_gather(x, layout, group, 7, "test_gather")
        halos = start_halos(x, layout, halo, group, 7, "test_halo")
        assert bool(gather.works) != timed and bool(halos.transfer.works) != timed
        gathered, with_halos = gather.wait(), halos.wait()
        keys = layout.window_key_positions(halo, "cpu")
        torch.testing.assert_close(gathered, values(torch.arange(SEQ)), rtol=0, atol=0)
        torch.testing.assert_close(with_halos, values(keys), rtol=0, atol=0)
        # Each token's gradient sums its uses on every rank: gathered by both ranks, and
        # read as key (chunk or halo) wherever window_key_positions lists it.
        loss = (gathered * values(torch.arange(SEQ))).sum() + (with_halos * values(keys)).sum()
        loss.backward()
        mine = layout.local_indices()[:, None]
        uses = sum((ly.window_key_positions(halo, "cpu")[None] == mine).sum(1) for ly in layouts)
        expected = values(layout.local_indices()) * (2 + uses[:, None])
        torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=0)
        return comm_timer.stop()

    assert not run(timed=False)  # the timer records nothing while off
    spans = run(timed=True)
    assert set(spans) == {(7, what, phase) for what in ("test_gather", "test_halo")
                          for phase in ("forward", "backward")}, spans
    assert all(ms >= 0 for ms in spans.values())


def cp2_comm_timer_in_a_model(rank, world_size):
    """A model step gives the same losses with the timer on, which times every exchange
    that `bytes_sent` counts."""
    config = tiny_config(context_parallel_size=2, **ASA)
    init_parallel(config)
    chunks = build_model(config)
    local = get_batch_on_this_cp_rank(batch())
    bytes_sent.clear()
    loss = forward_backward(chunks, local)
    assert not comm_timer.stop()
    comm_timer.start()
    timed_loss = forward_backward(chunks, local)
    spans = comm_timer.stop()
    torch.testing.assert_close(timed_loss, loss, rtol=0, atol=0)
    assert set(spans) == set(bytes_sent), (set(spans), set(bytes_sent))


TWO_RANKS = [
    cp2_local_and_global_layers,
    cp2_halo_spans_several_chunks,
    cp2_dense_and_nsa_layers,
    cp2_packed_documents,
    cp2_triton_kernels_with_recompute,
    cp2_full_layer_recompute,
    cp2_bad_inputs_fail_before_communication,
    cp2_exchanges_are_asynchronous_and_timed,
    cp2_comm_timer_in_a_model,
]


# --- four ranks ----------------------------------------------------------------------------


def cp4_chunks_shorter_than_the_window(rank, world_size):
    compare(ASA, cp=4)
    check_bytes(cp=4)


def tp2_cp2_with_sequence_parallelism(rank, world_size):
    compare(ASA, cp=2, tp=2, sequence_parallel=True)
    check_bytes(cp=2, tp=2)


def tp2_cp2_replicated_latent_head(rank, world_size):
    compare({**ASA, "global_num_latent_heads": 1, "sliding_window_size": 40}, cp=2, tp=2)


FOUR_RANKS = [
    cp4_chunks_shorter_than_the_window,
    tp2_cp2_with_sequence_parallelism,
    tp2_cp2_replicated_latent_head,
]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return run_checks(TWO_RANKS, 2, str(tmp_path_factory.mktemp("cp2") / "results.pt"))


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory):
    return run_checks(FOUR_RANKS, 4, str(tmp_path_factory.mktemp("cp4") / "results.pt"))


@pytest.mark.parametrize("check", [check.__name__ for check in TWO_RANKS])
def test_two_ranks(two_rank_results, check):
    assert two_rank_results[check] is None, two_rank_results[check]


@pytest.mark.parametrize("check", [check.__name__ for check in FOUR_RANKS])
def test_four_ranks(four_rank_results, check):
    assert four_rank_results[check] is None, four_rank_results[check]
