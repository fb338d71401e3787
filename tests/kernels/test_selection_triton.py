"""Triton block selection against the plain-PyTorch reference.

On the CPU interpreter (fp32, random inputs, so no near-ties) the indices must equal the
reference's exactly: same blocks, ascending, same -1 padding, for grouped heads, selection
groups that span several KV heads or share one, selection_query_block 1/2/3/4, packed
documents and lengths below one block. The `gpu` tests measure agreement in bf16, exactness
(up to near-ties) in fp32, and check sampled rows of a 262144-token sequence.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nsa_kernels import (
    compressed_attention,
    compressed_cu_seqlens,
    num_compressed_blocks,
    select_blocks,
)
from nsa_kernels.selection import reference, triton_op
from nsa_kernels.utils import softmax_scale

LENGTHS = [1, 7, 40, 77]
BLOCKS = [(4, 4), (8, 4), (4, 2)]  # (l, s)
SELECT_BLOCKS = [8, 16]  # l'
# (HQ, HK, HI): selection groups inside one KV head's group (4, 1, 1), (4, 1, 2); spanning
# several KV heads (4, 4, 2), (2, 2, 1), (8, 2, 1); one head each (4, 4, None).
HEADS = [(4, 1, 1), (4, 4, 2), (2, 2, 1), (4, 1, 2), (4, 4, None), (8, 2, 1)]
QUERY_BLOCKS = [1, 2, 4]
TOP_N = [3, 4, 6, 8]  # 8 > blocks in most sequences: -1 padding


def make_inputs(
    batch: int,
    seqlen: int,
    heads: int,
    kv_heads: int,
    dim: int,
    block: tuple[int, int],
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if cu_seqlens is None:
        num_cmp = num_compressed_blocks(seqlen, *block)
    else:
        num_cmp = int(compressed_cu_seqlens(cu_seqlens, *block)[-1])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, dim, generator=gen)
    k = torch.randn(batch, num_cmp, kv_heads, dim, generator=gen)
    return q.to(device, dtype), k.to(device, dtype)


CASES = [
    pytest.param(
        seqlen, block, select, HEADS[i % len(HEADS)], QUERY_BLOCKS[i % 3], TOP_N[i % 4],
        id=f"T{seqlen}-l{block[0]}s{block[1]}-sel{select}-h{HEADS[i % len(HEADS)]}"
        f"-q{QUERY_BLOCKS[i % 3]}-n{TOP_N[i % 4]}",
    )
    for i, (seqlen, block, select) in enumerate(
        itertools.product(LENGTHS, BLOCKS, SELECT_BLOCKS)
    )
]


@pytest.mark.parametrize("seqlen,block,select,heads,query_block,top_n", CASES)
def test_matches_reference(seqlen, block, select, heads, query_block, top_n):
    hq, hk, hi = heads
    q, k = make_inputs(2, seqlen, hq, hk, 16 + 8 * (seqlen % 2), block, seed=seqlen)
    args = (q, k, *block, select, top_n)
    kwargs = dict(num_selection_heads=hi, selection_query_block=query_block)
    got = select_blocks(*args, **kwargs, backend="triton")
    expected = select_blocks(*args, **kwargs, backend="reference")
    assert got.dtype == torch.int32
    assert torch.equal(got, expected)


@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_head_groupings_with_a_real_choice(heads):
    """Every grouping of HEADS where n = 4 of 19 blocks leaves a choice to get wrong (at
    CASES' lengths and n, many rows keep every block they may see): each head must read its
    own KV head and add into its own group."""
    hq, hk, hi = heads
    q, k = make_inputs(1, 150, hq, hk, 16, (8, 4), seed=16)
    kwargs = dict(num_selection_heads=hi, selection_query_block=2)
    got = select_blocks(q, k, 8, 4, 8, 4, **kwargs, backend="triton")
    expected = select_blocks(q, k, 8, 4, 8, 4, **kwargs, backend="reference")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("query_block", [1, 4])
@pytest.mark.parametrize("block", [(8, 4), (4, 2)])
def test_packed_sequences(block, query_block):
    """Documents of 1 token, of fewer tokens than one block, and longer ones; indices are
    document-relative."""
    cu_seqlens = torch.tensor([0, 1, 6, 51, 77], dtype=torch.int32)
    q, k = make_inputs(1, 77, 4, 2, 16, block, cu_seqlens, seed=11)
    args = (q, k, *block, 8, 4)
    kwargs = dict(selection_query_block=query_block, cu_seqlens=cu_seqlens)
    got = select_blocks(*args, **kwargs, num_selection_heads=1, backend="triton")
    expected = select_blocks(*args, **kwargs, num_selection_heads=1, backend="reference")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("block", [(8, 4), (4, 2)])
def test_small_steps_chunked_head_dim(block):
    """Running top-n of width 4 merged over many steps, compressed blocks spilling into the
    next step, DK = 24 read in 3 chunks."""
    config = triton_op.SelectConfig(
        rows=8, min_width=1, min_blocks=1, head_tile=8, head_chunk=8
    )
    q, k = make_inputs(2, 77, 4, 2, 24, block, seed=12)
    got = triton_op.select_blocks(q, k, *block, 8, 3, 2, 2, 0.4, config=config)
    expected = reference.select_blocks(q, k, *block, 8, 3, 2, 2, 0.4)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("query_block", [1, 4])
def test_gpu_tile_sizes_in_interpreter(query_block):
    """The tiles a GPU would use: 16-wide running top-n for n = 3, >= 16 query blocks."""
    q, k = make_inputs(1, 150, 4, 2, 24, (8, 4), seed=15)
    config = triton_op.SelectConfig()
    got = triton_op.select_blocks(q, k, 8, 4, 16, 3, 1, query_block, config=config)
    expected = reference.select_blocks(q, k, 8, 4, 16, 3, 1, query_block)
    assert torch.equal(got, expected)


def test_query_block_not_a_power_of_two():
    q, k = make_inputs(2, 77, 4, 1, 16, (4, 4), seed=13)
    args = (q, k, 4, 4, 12, 4)
    got = select_blocks(*args, selection_query_block=3, backend="triton")
    expected = select_blocks(*args, selection_query_block=3, backend="reference")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("query_block", [1, 4])
def test_later_queries_do_not_change_the_selection(query_block):
    """A query block shares its first query's selection: the selection of position t does not
    depend on the queries after t (summing the block's scores would make it)."""
    q, k = make_inputs(1, 64, 4, 2, 16, (4, 2), seed=5)
    t = 45
    q2 = q.clone()
    q2[:, t + 1 :] = torch.randn_like(q2[:, t + 1 :]) * 4
    args = (4, 2, 8, 4, 2, query_block)
    got = triton_op.select_blocks(q, k, *args)
    got2 = triton_op.select_blocks(q2, k, *args)
    assert torch.equal(got[:, : t + 1], got2[:, : t + 1])
    assert torch.equal(got, reference.select_blocks(q, k, *args))


def test_lse_from_compressed_attention_is_reused():
    """Passing compressed attention's LSE gives the same selection as recomputing it."""
    q, k = make_inputs(2, 40, 4, 2, 16, (4, 2), seed=14)
    v = torch.randn(*k.shape[:3], 8)
    _, lse = compressed_attention(q, k, v, 4, 2, backend="triton")
    args = (q, k, 4, 2, 8, 4)
    with_lse = select_blocks(*args, lse=lse, backend="triton")
    assert torch.equal(with_lse, select_blocks(*args, backend="triton"))
    assert torch.equal(with_lse, select_blocks(*args, lse=lse, backend="reference"))


def test_lse_of_wrong_shape_is_rejected():
    q, k = make_inputs(1, 40, 4, 2, 16, (4, 2))
    with pytest.raises(ValueError, match="lse"):
        select_blocks(q, k, 4, 2, 8, 4, lse=torch.zeros(1, 40, 2), backend="triton")


# --- GPU -------------------------------------------------------------------------------------


def as_sets(indices: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[..., n] int (-1 padded) -> [..., M] bool membership."""
    member = torch.zeros(*indices.shape[:-1], num_blocks + 1, dtype=torch.bool,
                         device=indices.device)
    member.scatter_(-1, indices.long() + 1, True)
    return member[..., 1:]


def pooled_scores(score: torch.Tensor, query_block: int) -> torch.Tensor:
    """Reference scores [B, T, HI, M] of each query block's first query, as the reference
    shares them."""
    seqlen = score.shape[1]
    return score[:, ::query_block].repeat_interleave(query_block, dim=1)[:, :seqlen]


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [1, 63, 1000, 4097])
@pytest.mark.parametrize("query_block", [1, 4])
def test_gpu_agreement_with_fp32_reference(seqlen, query_block):
    block, select, top_n = (32, 16), 64, 16
    q, k = make_inputs(1, seqlen, 16, 2, 192, block, device="cuda", seed=seqlen)
    args = (*block, select, top_n)
    kwargs = dict(num_selection_heads=2, selection_query_block=query_block)
    expected = select_blocks(q, k, *args, **kwargs, backend="reference")
    num_blocks = -(-seqlen // select)

    # bf16 inputs, LSE from the bf16 compressed attention: > 99% of the blocks in common.
    qb, kb = q.bfloat16(), k.bfloat16()
    vb = torch.randn(*kb.shape[:3], 128, device="cuda", dtype=torch.bfloat16)
    _, lse = compressed_attention(qb, kb, vb, *block, backend="triton")
    got = select_blocks(qb, kb, *args, **kwargs, lse=lse, backend="triton")
    common = (as_sets(got, num_blocks) & as_sets(expected, num_blocks)).sum()
    total = as_sets(expected, num_blocks).sum()
    assert common >= 0.99 * total, f"{common}/{total} blocks in common"

    # fp32 inputs: the same selection, except where the reference scores nearly tie.
    got = select_blocks(q, k, *args, **kwargs, backend="triton")
    differ = (got != expected).any(-1).nonzero().tolist()
    if differ:
        score = reference.block_importance(q, k, *block, select, 2)
        score = pooled_scores(score, query_block)
        for b, t, g in differ:
            changed = as_sets(got[b, t, g], num_blocks) ^ as_sets(expected[b, t, g], num_blocks)
            kept = as_sets(expected[b, t, g], num_blocks)
            current = t // select
            kept[[j for j in (0, current - 1, current) if j >= 0]] = False  # forced blocks
            boundary = score[b, t, g][kept].min()
            gap = (score[b, t, g][changed] - boundary).abs().max()
            assert gap <= 1e-5 * score[b, t, g].max(), f"row {(b, t, g)} differs by {gap}"
    assert len(differ) <= 1e-3 * got[..., 0].numel()


@pytest.mark.gpu
def test_gpu_long_sequence_sampled_rows():
    """T = 262144 with 64 heads of dim 192 (offsets pass 2^31 elements): on sampled rows the
    selection holds the forced blocks and the highest-scoring others."""
    block, select, top_n, seqlen = (32, 16), 64, 16, 262144
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_cmp = num_compressed_blocks(seqlen, *block)
    q = torch.randn(1, seqlen, 64, 192, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, num_cmp, 4, 192, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert q.numel() > 2**31
    indices = select_blocks(q, k, *block, select, top_n, backend="triton")

    rows = [0, 63, 64, 1000, 2**17 - 1, 2**17, seqlen - 65, seqlen - 1]
    t = torch.tensor(rows, device="cuda")
    num_blocks = seqlen // select
    scores = torch.einsum("rhd,nhd->rhn", q[0, t].float(),
                          k[0].float().repeat_interleave(16, dim=1))
    scores = scores * softmax_scale(None, 192)
    visible = torch.arange(num_cmp, device="cuda")[None, :] * block[1] + block[0] - 1 <= t[:, None]
    probs = torch.softmax(scores.masked_fill(~visible[:, None, :], float("-inf")), -1)
    probs = torch.nan_to_num(probs)  # rows that see no block
    overlap = reference.selection_overlap(num_cmp, num_blocks, *block, select, device="cuda")
    importance = (probs @ overlap).view(len(rows), 4, 16, num_blocks).sum(2)  # [R, HI, M]
    for r, pos in enumerate(rows):
        current = pos // select
        forced = {0, current, current - 1} - {-1}
        for g in range(4):
            chosen = set(indices[0, pos, g].tolist()) - {-1}
            assert len(chosen) == min(top_n, current + 1)
            assert forced <= chosen and max(chosen) <= current
            score = importance[r, g]
            others = sorted(chosen - forced)
            rest = sorted(set(range(current + 1)) - chosen)
            if others and rest:
                tol = 1e-3 * score[: current + 1].max()
                assert score[others].min() >= score[rest].max() - tol
