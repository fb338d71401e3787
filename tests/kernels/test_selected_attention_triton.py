"""Triton selected attention against the plain-PyTorch reference: output and the gradients of
q, k and v.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py) on fp32 CPU tensors
with awkward shapes: lengths that are not multiples of the block, more indices than blocks,
the three head layouts the model uses with every group size, packed documents, one block
chosen by every query (with its query list split over programs), rows that see no key, and
split head dims. The `gpu` tests compare bf16 kernels with an fp32 reference that gathers
only the selected blocks, so it also runs at 65k tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from nsa_kernels import nsa_attention, num_compressed_blocks, selected_attention
from nsa_kernels import reference as ref_ops
from nsa_kernels.selected_attention import reference, triton_op
from nsa_kernels.utils import compressed_cu_seqlens, masked_softmax, softmax_scale

GROUPS = [1, 2, 4, 8, 16, 32]  # G = HQ / HI


def layout_heads(layout: str, group: int, sel_heads: int = 2) -> tuple[int, int, int]:
    """(HQ, HK, HI) of a head layout: "gqa" (HI == HK), "gla" (un-absorbed, HK == HQ) or
    "latent" (absorbed: HK == HI, one KV head per latent head)."""
    heads = group * sel_heads
    if layout == "gla":
        return heads, heads, sel_heads
    return heads, sel_heads, sel_heads


def make_qkv(
    batch: int,
    seqlen: int,
    heads: tuple[int, int, int],
    dims: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaf tensors q [B, T, HQ, DK], k [B, T, HK, DK], v [B, T, HK, DV]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hq, hk, _ = heads
    shapes = [(batch, seqlen, hq, dims[0]), (batch, seqlen, hk, dims[0]),
              (batch, seqlen, hk, dims[1])]
    return tuple(
        torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
        for shape in shapes
    )


def doc_positions(
    seqlen: int, cu_seqlens: torch.Tensor | None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(start of each token's document [T], position inside it [T])."""
    tokens = torch.arange(seqlen, device=device)
    if cu_seqlens is None:
        return torch.zeros_like(tokens), tokens
    cu = cu_seqlens.to(device).long()
    bos = cu[torch.searchsorted(cu, tokens, right=True) - 1]
    return bos, tokens - bos


def random_indices(
    batch: int,
    seqlen: int,
    sel_heads: int,
    top_n: int,
    block_size: int,
    cu_seqlens: torch.Tensor | None = None,
    forced: bool = False,
    device: str = "cpu",
    seed: int = 0,
    chunk: int = 8192,
) -> torch.Tensor:
    """Unique random blocks <= each query's own block, ascending, -1 padded: [B, T, HI, n]
    int32. With `forced`, block 0 and the two most recent blocks are always among them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    _, t_rel = doc_positions(seqlen, cu_seqlens, device)
    current = t_rel // block_size
    num_blocks = int(current.max()) + 1 if seqlen else 1
    blocks = torch.arange(num_blocks, device=device)
    parts = []
    for start in range(0, seqlen, chunk):
        cur = current[start : start + chunk, None, None]  # [C, 1, 1]
        score = torch.rand(batch, cur.shape[0], sel_heads, num_blocks, generator=gen,
                           device=device)
        if forced:
            recent = (blocks == 0) | (blocks == cur) | (blocks == cur - 1)
            score = score.masked_fill(recent, 2.0)
        score = score.masked_fill(blocks > cur, -1.0)
        top = score.topk(min(top_n, num_blocks), dim=-1)
        picked = torch.where(top.values >= 0, top.indices, num_blocks).sort(-1).values
        picked = torch.where(picked == num_blocks, -1, picked)
        parts.append(torch.nn.functional.pad(picked, (0, top_n - picked.shape[-1]), value=-1))
    if not parts:
        return torch.empty(batch, 0, sel_heads, top_n, dtype=torch.int32, device=device)
    return torch.cat(parts, 1).to(torch.int32)


def scored_indices(
    q: torch.Tensor,
    sel_heads: int,
    top_n: int,
    block_size: int,
    cu_seqlens: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Indices from the reference `select_blocks` on random compressed keys (compression
    blocks of l'/2 tokens with stride l'/4)."""
    cmp_block, cmp_stride = max(block_size // 2, 1), max(block_size // 4, 1)
    if cu_seqlens is None:
        num_cmp = num_compressed_blocks(q.shape[1], cmp_block, cmp_stride)
    else:
        num_cmp = int(compressed_cu_seqlens(cu_seqlens, cmp_block, cmp_stride)[-1])
    gen = torch.Generator().manual_seed(seed)
    k_cmp = torch.randn(q.shape[0], num_cmp, sel_heads, q.shape[-1], generator=gen)
    return ref_ops.select_blocks(
        q.detach(), k_cmp, cmp_block, cmp_stride, block_size, top_n,
        num_selection_heads=sel_heads, cu_seqlens=cu_seqlens,
    )


def outputs_and_grads(fn, q, k, v, seed: int = 1) -> list[torch.Tensor]:
    """[o, dq, dk, dv] for the loss sum(o * dO) with a random dO."""
    o = fn(q, k, v)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o)
    return [o, *torch.autograd.grad(o, (q, k, v), do)]


def assert_matches_reference(q, k, v, indices, block_size, cu_seqlens=None, tiles=None,
                             scale=None):
    def kernel(q_, k_, v_):
        if tiles is None:
            return selected_attention(
                q_, k_, v_, indices, block_size, scale=scale, cu_seqlens=cu_seqlens,
                backend="triton",
            )
        return triton_op.selected_attention(
            q_, k_, v_, indices, block_size, scale, cu_seqlens, tiles
        )

    def oracle(q_, k_, v_):
        return reference.selected_attention(q_, k_, v_, indices, block_size, scale, cu_seqlens)

    got, expected = outputs_and_grads(kernel, q, k, v), outputs_and_grads(oracle, q, k, v)
    for name, a, b in zip(["o", "dq", "dk", "dv"], got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), f"{name} has inf/NaN"
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# --- CPU: the interpreter against the reference --------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("layout", ["gqa", "gla", "latent"])
def test_head_layouts_and_group_sizes(layout, group):
    """Every G in the three layouts; 13 tokens in blocks of 4 with n = 3."""
    sel_heads = 2 if group <= 8 else 1
    heads = layout_heads(layout, group, sel_heads)
    q, k, v = make_qkv(1, 13, heads, (16, 8), seed=group)
    indices = random_indices(1, 13, sel_heads, 3, 4, forced=True, seed=group)
    assert_matches_reference(q, k, v, indices, 4)


def test_more_selection_heads_than_kv_heads():
    """HI > HK (each KV head serves two selection heads): the inverse index is kept per KV
    head and its entries name the selection head."""
    q, k, v = make_qkv(2, 14, (8, 2, 4), (16, 8), seed=40)
    indices = random_indices(2, 14, 4, 3, 4, forced=True, seed=40)
    assert_matches_reference(q, k, v, indices, 4)


@pytest.mark.parametrize("top_n", [3, 5])
@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("seqlen", [1, 9, 50])
def test_lengths_blocks_and_top_n(seqlen, block_size, top_n):
    """T not a multiple of l', n above the number of blocks (-1 padding), batch 2, GQA with
    G = 2, indices from `select_blocks` and random ones, DK/DV 16/8 and 24/16."""
    dims = (16, 8) if top_n == 3 else (24, 16)
    q, k, v = make_qkv(2, seqlen, (4, 2, 2), dims, seed=seqlen + block_size)
    if block_size == 4:
        indices = scored_indices(q, 2, top_n, block_size, seed=seqlen)
    else:
        indices = random_indices(2, seqlen, 2, top_n, block_size, seed=seqlen)
    assert_matches_reference(q, k, v, indices, block_size)


@pytest.mark.parametrize(
    "layout,group", [("gqa", 4), ("gla", 2), ("latent", 8)], ids=["gqa", "gla", "latent"]
)
def test_packed_sequences(layout, group):
    """Three documents (of 1, 16 and 23 tokens); indices count blocks from each document."""
    cu_seqlens = torch.tensor([0, 1, 17, 40], dtype=torch.int32)
    heads = layout_heads(layout, group)
    q, k, v = make_qkv(1, 40, heads, (16, 8), seed=group)
    scored = scored_indices(q, 2, 3, 4, cu_seqlens, seed=1)
    assert_matches_reference(q, k, v, scored, 4, cu_seqlens=cu_seqlens)
    rand = random_indices(1, 40, 2, 4, 8, cu_seqlens, seed=2)
    assert_matches_reference(q, k, v, rand, 8, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("key_major", [True, False], ids=["key-major", "query-major"])
@pytest.mark.parametrize("chunk", [None, 5], ids=["whole-lists", "split-lists"])
def test_block_chosen_by_every_query(chunk, key_major):
    """Every query picks block 0 and its two most recent blocks: block 0's list holds all
    T queries. Split into pieces of 5 queries, fp32 partials are summed by a second kernel.
    Forward and dQ both from the key blocks' lists (atomics) and by query tiles."""
    seqlen, block_size = 30, 4
    q, k, v = make_qkv(1, seqlen, (8, 2, 2), (16, 8), seed=3)
    cur = torch.arange(seqlen) // block_size
    rows = torch.stack([torch.zeros_like(cur), cur - 1, cur], -1)  # [T, 3]
    rows = torch.where(rows < 0, -1, rows)
    rows[:, 1:] = torch.where(rows[:, 1:] == 0, -1, rows[:, 1:])  # no repeat of block 0
    indices = rows[None, :, None, :].expand(1, seqlen, 2, 3).to(torch.int32)
    tiles = triton_op.TileConfig(block_q=16, dkv_rows=16, dkv_chunk=chunk, num_stages=1,
                                 key_major=key_major)
    assert_matches_reference(q, k, v, indices, block_size, tiles=tiles)


def test_key_major_choice():
    """Forward and dQ from the key blocks for small units; by query tiles for units of 16
    heads, for head dims split over tiles, and when asked."""

    def key_major(heads: tuple[int, int, int], dims: tuple[int, int], **tiles) -> bool:
        prob = triton_op.Problem(
            block_size=64, scale=1.0, heads=triton_op.HeadLayout.build(*heads),
            layout=triton_op.SeqLayout(seq_len=8, cu_seqlens=None, lengths=(8,)),
            cfg=triton_op.TileConfig(**tiles),
        )
        return prob.key_major(*dims)

    assert key_major((16, 16, 2), (192, 128))  # per-head keys: units of one head
    assert not key_major((64, 4, 4), (128, 128))  # units of 16 heads
    assert not key_major((16, 2, 2), (576, 512))  # head dims split over tiles
    assert not key_major((16, 16, 2), (192, 128), key_major=False)
    assert key_major((64, 4, 4), (128, 128), key_major=True)


def loosen_score_bound(q: torch.Tensor, k: torch.Tensor, token: int, norm: float) -> None:
    """Give key `token` (in block 0, which every query chose) a huge norm along a direction
    no query has, so the rows' Cauchy-Schwarz bound sits far above their scores."""
    with torch.no_grad():
        q[..., 0] = 0.0
        k[:, token, :, 0] = norm


@pytest.mark.parametrize(
    "loose, redo", [(False, True), (False, False), (True, True), (True, False)],
    ids=["tight", "tight-no-redo", "loose", "loose-no-redo"],
)
def test_key_major_forward_with_a_tight_and_a_loose_score_bound(monkeypatch, loose, redo):
    """The key-major forward sums each row's exp2(s - bound) against a Cauchy-Schwarz bound;
    a key far from every query in direction but huge in norm loosens the bound of the rows
    that chose its block until their terms underflow, and those rows are summed again against
    their exact maxima. Without that second sum (BOUND_SLACK = inf flags no row) the loose
    rows come out wrong, so the test sees the case it means to."""
    q, k, v = make_qkv(1, 21, (4, 4, 2), (16, 8), seed=31)  # per-head keys: key-major
    indices = random_indices(1, 21, 2, 3, 4, forced=True, seed=31)
    if loose:
        loosen_score_bound(q, k, 2, 1e3)
    if not redo:
        monkeypatch.setattr(triton_op, "BOUND_SLACK", math.inf)
    if loose and not redo:
        with pytest.raises(AssertionError):
            assert_matches_reference(q, k, v, indices, 4)
    else:
        assert_matches_reference(q, k, v, indices, 4)


@pytest.mark.parametrize("loose", [False, True], ids=["tight", "loose"])
def test_key_major_forward_in_fp16(loose):
    """fp16 sums every row against its exact maximum (against a loose bound its P would lose
    bits): output and gradients within twice the fp16 reference's error of the fp32 one."""
    q, k, v = make_qkv(1, 21, (4, 4, 2), (16, 8), torch.float16, seed=32)
    indices = random_indices(1, 21, 2, 3, 4, forced=True, seed=32)
    if loose:
        loosen_score_bound(q, k, 2, 1e3)
    assert_bf16_close(q, k, v, indices, 4)


def test_deterministic_takes_no_atomics(monkeypatch):
    """`deterministic=True` (Megatron's deterministic_mode) runs the query-major forward and
    dQ even where the key-major ones (fp32 atomics) are the default, in the op and through
    nsa_attention."""
    q, k, v = make_qkv(1, 13, (4, 4, 2), (16, 8), seed=9)  # per-head keys: key-major default
    indices = random_indices(1, 13, 2, 3, 4, forced=True, seed=9)

    def refuse(*args, **kwargs):
        raise AssertionError("the key-major forward ran")

    monkeypatch.setattr(triton_op, "attention_forward_key_major", refuse)
    with pytest.raises(AssertionError, match="key-major"):
        selected_attention(q, k, v, indices, 4, backend="triton")
    got = outputs_and_grads(
        lambda *x: selected_attention(*x, indices, 4, deterministic=True, backend="triton"),
        q, k, v,
    )
    expected = outputs_and_grads(
        lambda *x: reference.selected_attention(*x, indices, 4), q, k, v
    )
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)

    k_cmp, v_cmp = (torch.randn(1, 5, 4, d) for d in (16, 8))
    gates = torch.rand(2, 1, 13, 4)
    nsa_attention(q, k, v, k_cmp, v_cmp, *gates, block_size=4, stride=2, select_block_size=4,
                  top_n=3, num_selection_heads=2, deterministic=True, backend="triton")


def test_rows_without_keys_give_zeros_and_finite_grads():
    """Rows with only -1, or only blocks after their own (no key j <= t): o = 0, no NaN."""
    seqlen, block_size = 20, 4
    q, k, v = make_qkv(2, seqlen, (4, 2, 2), (16, 8), seed=4)
    indices = random_indices(2, seqlen, 2, 3, block_size, seed=4)
    empty = torch.tensor([0, 3, 9, 19])
    indices[:, empty] = -1
    indices[0, 5, 1] = torch.tensor([3, 4, -1], dtype=torch.int32)  # t = 5 is in block 1
    o = selected_attention(q, k, v, indices, block_size, backend="triton")
    assert torch.equal(o[:, empty], torch.zeros_like(o[:, empty]))
    assert torch.equal(o[0, 5, 2:], torch.zeros_like(o[0, 5, 2:]))  # heads of selection 1
    assert_matches_reference(q, k, v, indices, block_size)
    all_empty = torch.full_like(indices, -1)
    o = selected_attention(q, k, v, all_empty, block_size, backend="triton")
    assert torch.equal(o, torch.zeros_like(o))
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize(
    "seqlen,tiles",
    [
        (11, triton_op.TileConfig(block_q=1, dkv_rows=16, num_stages=1)),
        (19, triton_op.TileConfig(block_q=3, dkv_rows=64, num_stages=1)),
        (37, triton_op.TileConfig(block_q=31, dkv_rows=12, dkv_chunk=7, num_stages=1)),
        (37, triton_op.TileConfig(block_q=31, dkv_rows=12, num_stages=1, key_major=False)),
        (19, triton_op.TileConfig(block_q=3, dkv_rows=64, num_stages=1, key_major=False)),
    ],
    ids=["q1", "q3", "q31-split", "q31-query-major", "q3-query-major"],
)
def test_query_tile_sizes(seqlen, tiles):
    """One query per program, odd tiles, and one tile holding 31 queries' selections (with
    the forward and dQ from the key blocks, and by query tiles)."""
    q, k, v = make_qkv(1, seqlen, (4, 4, 2), (16, 8), seed=5)
    indices = random_indices(1, seqlen, 2, 4, 4, forced=True, seed=5)
    assert_matches_reference(q, k, v, indices, 4, tiles=tiles, scale=0.4)


def test_split_head_dims():
    """DK = 24 reduced in 3 chunks of 8 and accumulated in 2 tiles of 16; DV = 40 in 3 tiles."""
    tiles = triton_op.TileConfig(block_q=8, dkv_rows=16, head_tile=16, head_chunk=8,
                                 num_stages=1)
    q, k, v = make_qkv(1, 11, (2, 2, 1), (24, 40), seed=6)
    indices = random_indices(1, 11, 1, 3, 4, forced=True, seed=6)
    assert_matches_reference(q, k, v, indices, 4, tiles=tiles)


@pytest.mark.parametrize("key_major", [True, False], ids=["key-major", "query-major"])
@pytest.mark.parametrize("dk", [48, 40])
def test_whole_key_dim_in_two_parts(dk, key_major):
    """DK = 48 held as 32 + 16 and DK = 40 as 32 + 16 (the second part masked past 40), in
    every kernel: both forwards, dQ by query tiles and dQ added from the key blocks."""
    tiles = triton_op.TileConfig(block_q=4, dkv_rows=16, key_rows=16, num_stages=1,
                                 key_major=key_major)
    assert tiles.split(dk).parts == (32, 16)
    q, k, v = make_qkv(1, 19, (4, 4, 2), (dk, 16), seed=dk)
    indices = random_indices(1, 19, 2, 3, 4, forced=True, seed=dk)
    assert_matches_reference(q, k, v, indices, 4, tiles=tiles, scale=0.3)


def test_latent_absorbed_head_dims():
    """DK = 576, DV = 512 (d_c' + d_R and the latent): wider than one register tile."""
    q, k, v = make_qkv(1, 10, (4, 1, 1), (576, 512), seed=7)
    indices = random_indices(1, 10, 1, 2, 4, forced=True, seed=7)
    assert_matches_reference(q, k, v, indices, 4, scale=0.05)


def test_repeated_unsorted_and_int64_indices():
    """Repeats count once and order does not matter, as in the reference."""
    q, k, v = make_qkv(1, 16, (2, 2, 2), (16, 8), seed=8)
    indices = random_indices(1, 16, 2, 3, 4, seed=8).long()
    indices = torch.cat([indices.flip(-1), indices[..., :1]], -1)  # descending + a repeat
    assert_matches_reference(q, k, v, indices, 4)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(9)
    fused = torch.randn(2, 21, 4, 40, generator=gen)  # q next to an unused slice
    q = fused[..., 8:24].detach().requires_grad_()
    kv = torch.randn(2, 21, 2, 24, generator=gen)
    k = kv[..., :16].detach().requires_grad_()
    v = kv.transpose(1, 2).contiguous().transpose(1, 2)[..., 16:].detach().requires_grad_()
    indices = random_indices(2, 21, 2, 3, 4, seed=9).transpose(1, 2).contiguous().transpose(1, 2)
    assert_matches_reference(q, k, v, indices, 4)


def test_rejects_unsupported_head_mapping_and_tiles():
    q, k, v = make_qkv(1, 8, (6, 2, 3), (16, 8))
    indices = random_indices(1, 8, 3, 2, 4)
    with pytest.raises(ValueError, match="divide one another"):
        selected_attention(q, k, v, indices, 4, backend="triton")
    q, k, v = make_qkv(1, 8, (4, 2, 2), (16, 8))
    with pytest.raises(ValueError, match="block_q"):
        triton_op.selected_attention(
            q, k, v, random_indices(1, 8, 2, 2, 4), 4, tiles=triton_op.TileConfig(block_q=32)
        )


def test_inverse_index_lists_every_choice_once():
    """CSR rows: the queries (ascending) whose selection holds the block, skipping -1,
    repeats and blocks after the query's own; every row here has a usable choice."""
    indices = torch.tensor([[0, -1], [0, 0], [1, 0], [1, -1], [0, 5]], dtype=torch.int32)
    indices = indices[None, :, None, :]  # [1, T=5, HI=1, 2] with l' = 2
    heads = triton_op.HeadLayout.build(2, 1, 1)
    layout = triton_op.SeqLayout.build(5, None, torch.device("cpu"))
    index = triton_op.inverse_index(indices, 2, heads, layout)
    offsets, entries, num_blocks = index.offsets, index.entries, index.num_blocks
    assert num_blocks == 3
    assert offsets.tolist() == [0, 4, 6, 6]
    assert entries.numel() == 10  # a slot per choice: the unusable ones after offsets[-1]
    assert entries[:6].tolist() == [0, 1, 2, 4, 2, 3]
    assert index.chosen[0, :, 0].tolist() == [True] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [16, 96, 576])
def test_row_norms_of_strided_rows(dim, dtype):
    """The score bound's norms: fp32 L2 norms over the last dim of [B, T, H, D] views with
    their own strides (a slice, heads before tokens), widths over one chunk included."""
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(2, 3, 7, dim + 8, generator=gen).to(dtype)
    for view in (x[..., 8:], x.transpose(1, 2)[..., :dim]):
        expected = torch.linalg.vector_norm(view.float(), dim=-1)
        torch.testing.assert_close(triton_op.row_norms(view), expected)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 100])
def test_split_work_cuts_each_list_and_pads_the_rest(chunk):
    """Every segment's list [offsets[s], offsets[s+1]) is covered once by its items, in
    pieces of at most `chunk`; a list of several pieces has its own consecutive slots and a
    split row; the rows past the real ones are padding (segment -1), and the sizes are
    bounds that need no look at the lists."""
    counts = [0, 4, 1, 0, 7, 2, 5]
    offsets = torch.tensor([0, *itertools.accumulate(counts)])
    total = int(offsets[-1]) + 3  # three unusable choices after the lists
    items, splits, num_slots = triton_op.split_work(offsets, chunk, total)
    real = items[items[:, 0] >= 0]
    assert (items[len(real):, 0] == -1).all()  # padding only after the real items
    assert (splits[(splits[:, 0] >= 0).sum():, 0] == -1).all()
    got_splits = {}
    for s in range(len(counts)):
        pieces = real[real[:, 0] == s]
        starts = list(range(int(offsets[s]), int(offsets[s + 1]), chunk)) or [int(offsets[s])]
        assert pieces[:, 1].tolist() == starts
        assert pieces[:, 2].tolist() == [min(a + chunk, int(offsets[s + 1])) for a in starts]
        if len(starts) == 1:
            assert pieces[:, 3].tolist() == [-1]
        else:
            slots = pieces[:, 3].tolist()
            assert slots == list(range(slots[0], slots[0] + len(starts)))
            assert max(slots) < num_slots
            got_splits[s] = (slots[0], slots[0] + len(starts))
    rows = {int(r[0]): (int(r[1]), int(r[2])) for r in splits if r[0] >= 0}
    assert rows == got_splits
    slots = real[:, 3][real[:, 3] >= 0]
    assert sorted(slots.tolist()) == list(range(len(slots)))  # each slot used once


# --- GPU: bf16 kernels against an fp32 reference that gathers the selected blocks ----------


def gathered_attention(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    tokens: torch.Tensor,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selected attention of the queries at `tokens` [C] (q_rows [B, C, HQ, DK]) from their
    selected blocks alone: -> [B, C, HQ, DV]. Products in the input dtype, softmax in fp32
    (as the reference); indices must be unique per row."""
    batch, _, heads, _ = q_rows.shape
    seqlen, device = k.shape[1], k.device
    scale = softmax_scale(scale, q_rows.shape[-1])
    bos, t_rel = (x[tokens] for x in doc_positions(seqlen, cu_seqlens, device))
    kv_head = torch.arange(heads, device=device) // (heads // k.shape[2])
    sel_head = torch.arange(heads, device=device) // (heads // block_indices.shape[2])
    idx = block_indices[:, tokens][:, :, sel_head].long()  # [B, C, HQ, n]
    pos = idx[..., None] * block_size + torch.arange(block_size, device=device)
    mask = (idx[..., None] >= 0) & (pos <= t_rel[None, :, None, None, None])
    pos = (bos[None, :, None, None, None] + pos).clamp(0, seqlen - 1).flatten(-2)  # [B,C,HQ,S]
    mask = mask.flatten(-2)
    b = torch.arange(batch, device=device)[:, None, None, None]
    k_sel = k[b, pos, kv_head[None, None, :, None]]  # [B, C, HQ, S, DK]
    v_sel = v[b, pos, kv_head[None, None, :, None]]  # [B, C, HQ, S, DV]
    scores = torch.einsum("bchd,bchsd->bchs", q_rows, k_sel) * scale
    probs, _ = masked_softmax(scores, mask)
    return torch.einsum("bchs,bchsd->bchd", probs.to(v.dtype), v_sel)


def chunked_reference(q, k, v, block_indices, block_size, cu_seqlens=None,
                      budget: int = 2**28) -> torch.Tensor:
    """`gathered_attention` over all queries, a chunk at a time (recomputed in the backward,
    so the gathered keys of only one chunk exist at once)."""
    seqlen, heads = q.shape[1], q.shape[2]
    width = heads * block_indices.shape[-1] * block_size * max(q.shape[-1], v.shape[-1])
    chunk = max(1, budget // (q.shape[0] * width))

    def part(q_, k_, v_, start: int):
        tokens = torch.arange(start, min(start + chunk, seqlen), device=q.device)
        return gathered_attention(q_[:, tokens], k_, v_, block_indices, block_size, tokens,
                                  cu_seqlens=cu_seqlens)

    parts = [checkpoint(part, q, k, v, s, use_reentrant=False) for s in range(0, seqlen, chunk)]
    return torch.cat(parts, 1)


def test_chunked_reference_matches_reference():
    """The GPU tests' oracle is exact: checked here against the dense reference."""
    cu_seqlens = torch.tensor([0, 1, 17, 30], dtype=torch.int32)
    q, k, v = make_qkv(1, 30, (8, 8, 2), (16, 8), seed=10)
    indices = random_indices(1, 30, 2, 3, 4, cu_seqlens, forced=True, seed=10)

    def oracle(q_, k_, v_):
        return reference.selected_attention(q_, k_, v_, indices, 4, None, cu_seqlens)

    def chunked(q_, k_, v_):
        return chunked_reference(q_, k_, v_, indices, 4, cu_seqlens, budget=6000)

    for a, b in zip(outputs_and_grads(chunked, q, k, v), outputs_and_grads(oracle, q, k, v),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with ||b|| at least an RMS of 1e-3 (gradients that vanish: T = 1)."""
    a, b = a.double(), b.double()
    floor = 1e-3 * max(b.numel(), 1) ** 0.5
    return ((a - b).norm() / b.norm().clamp(min=floor)).item()


def assert_bf16_close(q, k, v, indices, block_size, cu_seqlens=None, tiles=None):
    """|kernel(bf16) - ref(fp32)| <= 2 |ref(bf16) - ref(fp32)| (+ 1e-3) for o, dq, dk, dv;
    `tiles` replaces the default tile configuration."""
    gold_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]

    def ref(q_, k_, v_):
        return chunked_reference(q_, k_, v_, indices, block_size, cu_seqlens)

    def kernel(q_, k_, v_):
        if tiles is not None:
            return triton_op.selected_attention(q_, k_, v_, indices, block_size, None,
                                                cu_seqlens, tiles)
        return selected_attention(q_, k_, v_, indices, block_size, cu_seqlens=cu_seqlens,
                                  backend="triton")

    gold = outputs_and_grads(ref, *gold_inputs)
    ref_bf16 = outputs_and_grads(ref, q, k, v)
    got = outputs_and_grads(kernel, q, k, v)
    for name, a, r, g in zip(["o", "dq", "dk", "dv"], got, ref_bf16, gold, strict=True):
        assert a.dtype == r.dtype and torch.isfinite(a).all(), name
        err, ref_err = rel_err(a, g), rel_err(r, g)
        assert err <= 2 * ref_err + 1e-3, f"{name}: kernel {err:.2e} vs reference {ref_err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [1, 63, 1000, 4097, 65536])
def test_gpu_bf16_lengths(seqlen):
    """GQA with G = 8, DK/DV = 192/128, l' = 64, n = 16 (block 0 and recent blocks forced, so
    at 65k block 0's list is split over programs)."""
    heads = (16, 2, 2)
    q, k, v = make_qkv(1, seqlen, heads, (192, 128), torch.bfloat16, "cuda", seed=seqlen)
    indices = random_indices(1, seqlen, 2, 16, 64, forced=True, device="cuda", seed=seqlen)
    assert_bf16_close(q, k, v, indices, 64)


@pytest.mark.gpu
def test_gpu_bf16_query_major():
    """The query-major forward and dQ (key_major=False) at the shapes of the default's tests."""
    q, k, v = make_qkv(1, 4097, (16, 2, 2), (192, 128), torch.bfloat16, "cuda", seed=7)
    indices = random_indices(1, 4097, 2, 16, 64, forced=True, device="cuda", seed=7)
    defaults = triton_op.default_tiles(q.device, q.dtype, 192, 128)
    tiles = dataclasses.replace(defaults, key_major=False)
    assert_bf16_close(q, k, v, indices, 64, tiles=tiles)


@pytest.mark.gpu
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("layout", ["gqa", "gla", "latent"])
def test_gpu_bf16_layouts_and_groups(layout, group):
    heads = layout_heads(layout, group)
    dims = (576, 512) if layout == "latent" else (128, 128)
    q, k, v = make_qkv(1, 4097, heads, dims, torch.bfloat16, "cuda", seed=group)
    indices = random_indices(1, 4097, 2, 16, 64, forced=True, device="cuda", seed=group)
    assert_bf16_close(q, k, v, indices, 64)


@pytest.mark.gpu
def test_gpu_packed_sequences():
    cu_seqlens = torch.tensor([0, 1, 100, 3000, 8192], dtype=torch.int32, device="cuda")
    q, k, v = make_qkv(1, 8192, (16, 2, 2), (192, 128), torch.bfloat16, "cuda", seed=11)
    indices = random_indices(1, 8192, 2, 16, 64, cu_seqlens, forced=True, device="cuda",
                             seed=11)
    assert_bf16_close(q, k, v, indices, 64, cu_seqlens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loose", [False, True], ids=["tight", "loose"])
def test_gpu_key_major_forward_both_ways(loose, dtype):
    """The 350m preset's global layer (16 heads with their own keys, 2 selection heads,
    96/64): rows summed against their score bound, and the rows a huge key orthogonal to
    every query makes sum again against their exact maxima (as the CPU test); fp16 sums
    every row against its maximum."""
    q, k, v = make_qkv(1, 4097, (16, 16, 2), (96, 64), dtype, "cuda", seed=14)
    indices = random_indices(1, 4097, 2, 16, 64, forced=True, device="cuda", seed=14)
    if loose:
        loosen_score_bound(q, k, 5, 1e4)
    assert_bf16_close(q, k, v, indices, 64)


@pytest.mark.gpu
def test_gpu_block_chosen_by_every_query():
    """Each query reads only block 0 and its own block: block 0 takes 32k queries x 16 heads."""
    seqlen, block_size = 32768, 64
    q, k, v = make_qkv(1, seqlen, (16, 1, 1), (128, 128), torch.bfloat16, "cuda", seed=12)
    cur = torch.arange(seqlen, device="cuda") // block_size
    indices = torch.stack([torch.zeros_like(cur), torch.where(cur > 0, cur, -1)], -1)
    indices = indices[None, :, None, :].to(torch.int32)
    assert_bf16_close(q, k, v, indices, block_size)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(64, 4, 4), (64, 64, 4)], ids=["query-major", "key-major"])
def test_gpu_long_sequence_forward_sampled_rows(heads):
    """T = 262144 with 64 heads of dim 192: offsets pass 2^31 elements (int64 addressing), in
    the query-major forward (GQA, 16 heads per KV head) and the key-major one (per-head keys,
    where the per-entry and output buffers are indexed too)."""
    seqlen, block_size = 262144, 64
    q, k, v = make_qkv(1, seqlen, heads, (192, 128), torch.bfloat16, "cuda", seed=13)
    assert q.numel() > 2**31
    indices = random_indices(1, seqlen, 4, 16, block_size, forced=True, device="cuda", seed=13)
    with torch.no_grad():
        o = selected_attention(q, k, v, indices, block_size, backend="triton")
        rows = torch.tensor([0, 63, 64, 1000, 2**17 - 1, 2**17, seqlen - 65, seqlen - 1],
                            device="cuda")
        expected = gathered_attention(q[:, rows].float(), k.float(), v.float(), indices,
                                      block_size, rows)
    torch.testing.assert_close(o[:, rows].float(), expected, atol=2e-2, rtol=2e-2)
