"""Triton compressed attention against the plain-PyTorch reference: output, log-sum-exp and
the gradients of q, k_cmp and v_cmp (the LSE's gradient included).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py) on fp32 CPU tensors
with awkward shapes: lengths that are not multiples of any block, sequences shorter than one
block, grouped heads, DK != DV, packed documents, and tiles small enough that every loop runs
several times. The `gpu` tests compare bf16 kernels with the fp32 reference at long lengths.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from nsa_kernels import compressed_attention, compressed_cu_seqlens, num_compressed_blocks
from nsa_kernels.compressed_attention import reference, triton_op
from nsa_kernels.utils import masked_attention, softmax_scale

HEADS = [(4, 1), (4, 4), (2, 2)]  # (HQ, HK)
DIMS = [(16, 8), (24, 16)]  # (DK, DV)
LENGTHS = [1, 7, 40, 77]
BLOCKS = [(4, 4), (8, 4), (4, 2)]  # (l, s)
# Small tiles: several query tiles and key steps, DK = 24 read in 3 chunks and accumulated
# in 2 tiles, dK/dV summed over 3 query splits.
SMALL_TILES = triton_op.TileConfig(
    block_t=16, block_n=16, head_tile=16, head_chunk=8, num_stages=1, dkv_splits=3
)


def make_inputs(
    batch: int,
    seqlen: int,
    heads: tuple[int, int],
    dims: tuple[int, int],
    block: tuple[int, int],
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaf tensors q [B, T, HQ, DK], k_cmp [B, N, HK, DK], v_cmp [B, N, HK, DV]."""
    if cu_seqlens is None:
        num_cmp = num_compressed_blocks(seqlen, *block)
    else:
        num_cmp = int(compressed_cu_seqlens(cu_seqlens, *block)[-1])
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (batch, seqlen, heads[0], dims[0]),
        (batch, num_cmp, heads[1], dims[0]),
        (batch, num_cmp, heads[1], dims[1]),
    ]
    return tuple(
        torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for shape in shapes
    )


Attention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def outputs_and_grads(
    fn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: int = 1
) -> list[torch.Tensor]:
    """[o, lse, dq, dk, dv] for a loss that weighs both o and the (finite) lse randomly."""
    o, lse = fn(q, k, v)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).bfloat16().to(o)  # same values in every dtype
    dlse = torch.randn(lse.shape, generator=gen).to(lse)
    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    loss = (o.float() * do.float()).sum() + (finite_lse * dlse).sum()
    return [o, lse, *torch.autograd.grad(loss, (q, k, v))]


def assert_matches_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: tuple[int, int],
    cu_seqlens: torch.Tensor | None = None,
    tiles: triton_op.TileConfig | None = None,
    scale: float | None = None,
) -> None:
    def kernel(q_, k_, v_):
        if tiles is None:
            return compressed_attention(
                q_, k_, v_, *block, scale=scale, cu_seqlens=cu_seqlens, backend="triton"
            )
        return triton_op.compressed_attention(q_, k_, v_, *block, scale, cu_seqlens, tiles)

    def oracle(q_, k_, v_):
        return reference.compressed_attention(q_, k_, v_, *block, scale, cu_seqlens)

    got, expected = outputs_and_grads(kernel, q, k, v), outputs_and_grads(oracle, q, k, v)
    for name, a, b in zip(["o", "lse", "dq", "dk_cmp", "dv_cmp"], got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all() or name == "lse", f"{name} has inf/NaN"
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


CASES = [
    pytest.param(
        seqlen, block, HEADS[i % 3], DIMS[(i // 3) % 2],
        id=f"T{seqlen}-l{block[0]}s{block[1]}-h{HEADS[i % 3]}-d{DIMS[(i // 3) % 2]}",
    )
    for i, (seqlen, block) in enumerate(itertools.product(LENGTHS, BLOCKS))
]


@pytest.mark.parametrize("seqlen,block,heads,dims", CASES)
def test_matches_reference(seqlen, block, heads, dims):
    q, k, v = make_inputs(2, seqlen, heads, dims, block, seed=seqlen)
    assert_matches_reference(q, k, v, block)


@pytest.mark.parametrize("block", BLOCKS)
def test_small_tiles_and_split_head_dims(block):
    """Several tiles per loop, DK split into chunks and tiles, dK/dV over 3 query splits."""
    q, k, v = make_inputs(2, 61, (2, 1), (24, 16), block, seed=3)
    assert_matches_reference(q, k, v, block, tiles=SMALL_TILES, scale=0.3)


@pytest.mark.parametrize("block", [(4, 2), (8, 4)])
@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["default", "small"])
def test_packed_sequences(block, tiles):
    """Documents of 1 token, of fewer tokens than one block, and longer ones."""
    cu_seqlens = torch.tensor([0, 1, 4, 40, 61], dtype=torch.int32)
    q, k, v = make_inputs(1, 61, (4, 2), (24, 16), block, cu_seqlens, seed=4)
    assert_matches_reference(q, k, v, block, cu_seqlens=cu_seqlens, tiles=tiles)


def test_packed_tile_tables_put_the_longest_tiles_first():
    """Each (document, tile) once; query tiles by descending end position (their visible
    blocks), compressed-key tiles by descending count of compressed tokens from their start
    (the queries that see them)."""
    cu_seqlens = torch.tensor([0, 5, 70, 100, 260], dtype=torch.int32)
    layout = triton_op.SeqLayout.build(260, 8, 4, cu_seqlens)
    for block, compressed in [(16, False), (4, True)]:
        table, count = layout.tiles(block, torch.device("cpu"), compressed)
        lengths = layout.cmp_lengths if compressed else layout.lengths
        rows = [tuple(row) for row in table.tolist()]
        expected = {(d, i) for d, n in enumerate(lengths) for i in range(-(-n // block))}
        assert count == len(rows) == len(expected) and set(rows) == expected
        if compressed:
            work = [lengths[d] - i * block for d, i in rows]
        else:
            work = [min((i + 1) * block, lengths[d]) for d, i in rows]
        assert work == sorted(work, reverse=True), rows


# dK/dV in steps of 16 queries over key tiles of 16 blocks: at (l, s) = (8, 4) the first key
# tile's last block is seen from query 67 on, so key tiles run masked steps on the causal
# edge, unmasked whole steps after it, and a masked partial step at the end (200 = 12 x 16 + 8).
EDGE_TILES = triton_op.TileConfig(
    block_t=16, block_n=16, dkv_block_n=16, dkv_block_t=16, num_stages=1, dkv_splits=1
)


@pytest.mark.parametrize("cu_seqlens", [None, [0, 90, 200]], ids=["one", "packed"])
@pytest.mark.parametrize("splits,whole_steps", [(1, True), (2, True), (2, False)])
def test_dkv_steps_with_and_without_masks(cu_seqlens, splits, whole_steps):
    """The dK/dV pass's steps (causal edge, whole tiles, partial last tile) together, over
    one or two documents and split query ranges; and all of them masked."""
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    q, k, v = make_inputs(1, 200, (4, 2), (24, 16), (8, 4), cu, seed=7)
    tiles = replace(EDGE_TILES, dkv_splits=splits, dkv_whole_steps=whole_steps)
    assert_matches_reference(q, k, v, (8, 4), cu_seqlens=cu, tiles=tiles)


@pytest.mark.parametrize("dims", [(24, 16), (128, 64), (192, 128)])
def test_gpu_tile_sizes_in_interpreter(dims):
    """The tiles a GPU would use for bf16 at each head-dim class, so that their masks and
    loops are checked too."""
    tiles = triton_op.default_tiles(torch.device("cuda"), torch.bfloat16, *dims)
    q, k, v = make_inputs(1, 150, (4, 2), dims, (8, 4), seed=9)
    assert_matches_reference(q, k, v, (8, 4), tiles=tiles)


@pytest.mark.parametrize("dk", [48, 40])
def test_whole_key_dim_in_two_parts(dk):
    """DK = 48 held as 32 + 16 and DK = 40 as 32 + 16 (the second part masked past 40) in
    the forward, dQ and dK/dV kernels, dK/dV over 2 query splits."""
    tiles = triton_op.TileConfig(block_t=16, block_n=16, num_stages=1, dkv_splits=2)
    assert tiles.split(dk).parts == (32, 16)
    q, k, v = make_inputs(2, 45, (4, 2), (dk, 16), (8, 4), seed=dk)
    assert_matches_reference(q, k, v, (8, 4), tiles=tiles, scale=0.3)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    block = (4, 2)
    fused = torch.randn(2, 40, 4, 40, generator=gen)  # q and an unused slice side by side
    q = fused[..., 8:32].detach().requires_grad_()
    kv = torch.randn(2, num_compressed_blocks(40, *block), 2, 40, generator=gen)
    k = kv[..., :24].detach().requires_grad_()
    v = kv.transpose(1, 2).contiguous().transpose(1, 2)[..., 24:].detach().requires_grad_()
    assert_matches_reference(q, k, v, block)


def test_latent_absorbed_head_dims():
    """DK = 576, DV = 512: wider than one register tile, so reduced in chunks and tiled."""
    q, k, v = make_inputs(1, 40, (2, 1), (576, 512), (8, 4), seed=6)
    assert_matches_reference(q, k, v, (8, 4), scale=0.05)


def test_rows_without_visible_block_give_zeros_and_finite_grads():
    """T < l: no query sees a block; o = 0, lse = -inf, zero gradients, no NaN anywhere."""
    q, k, v = make_inputs(2, 7, (4, 2), (16, 8), (8, 4), seed=7)
    assert k.shape[1] == 0
    o, lse = compressed_attention(q, k, v, 8, 4, backend="triton")
    assert torch.equal(o, torch.zeros_like(o))
    assert torch.isneginf(lse).all()
    (dq,) = torch.autograd.grad(o.sum(), q)
    assert torch.equal(dq, torch.zeros_like(dq))


@pytest.mark.parametrize("use", ["o", "lse"])
def test_gradient_through_one_output_only(use):
    q, k, v = make_inputs(2, 40, (4, 1), (16, 8), (4, 2), seed=8)
    inputs = (q, k, v) if use == "o" else (q, k)  # v does not reach the lse
    grads = []
    for backend in ("triton", "reference"):
        o, lse = compressed_attention(q, k, v, 4, 2, backend=backend)
        out = o if use == "o" else torch.where(torch.isfinite(lse), lse, 0.0)
        grads.append(torch.autograd.grad((out * out).sum(), inputs))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# --- GPU: bf16 kernels against the fp32 reference ------------------------------------------


def chunked_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: tuple[int, int], chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's masked attention, one chunk of queries at a time (recomputed in the
    backward), so that T x N never exists at once at long T."""
    size, stride = block
    scale = softmax_scale(None, q.shape[-1])
    blocks = torch.arange(k.shape[1], device=q.device)

    def part(q_part: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, start: int):
        t = torch.arange(start, start + q_part.shape[1], device=q.device)
        mask = blocks[None, :] * stride + size - 1 <= t[:, None]  # reference visibility rule
        return masked_attention(q_part, k_, v_, mask, scale)

    parts = [
        checkpoint(part, q[:, s : s + chunk], k, v, s, use_reentrant=False)
        for s in range(0, q.shape[1], chunk)
    ]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a))
    a, b = a[finite], b[finite]
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item() if b.numel() else 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [1, 63, 1000, 4097, 65536])
@pytest.mark.parametrize("dims", [(192, 128), (128, 128)])
def test_gpu_bf16_error_within_twice_reference_error(seqlen, dims):
    """|kernel(bf16) - ref(fp32)| <= 2 |ref(bf16) - ref(fp32)| for o, lse and all gradients."""
    block = (32, 16)
    q, k, v = make_inputs(1, seqlen, (16, 2), dims, block, dtype=torch.bfloat16, device="cuda")
    gold_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]

    def ref(q_, k_, v_):
        return chunked_reference(q_, k_, v_, block)

    def kernel(q_, k_, v_):
        return compressed_attention(q_, k_, v_, *block, backend="triton")

    gold = outputs_and_grads(ref, *gold_inputs)
    ref_bf16 = outputs_and_grads(ref, q, k, v)
    got = outputs_and_grads(kernel, q, k, v)
    for name, a, r, g in zip(["o", "lse", "dq", "dk", "dv"], got, ref_bf16, gold, strict=True):
        assert a.dtype == r.dtype, name
        err, ref_err = rel_err(a, g), rel_err(r, g)
        assert err <= 2 * ref_err + 1e-6, f"{name}: kernel {err:.2e} vs reference {ref_err:.2e}"


@pytest.mark.gpu
def test_gpu_packed_and_latent_dims_bf16():
    block = (32, 16)
    cu_seqlens = torch.tensor([0, 1, 20, 2100, 4097], dtype=torch.int32, device="cuda")
    q, k, v = make_inputs(
        1, 4097, (8, 2), (576, 512), block, cu_seqlens, dtype=torch.bfloat16, device="cuda"
    )
    gold_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]

    def ref(q_, k_, v_):
        return reference.compressed_attention(q_, k_, v_, *block, None, cu_seqlens)

    def kernel(q_, k_, v_):
        return compressed_attention(q_, k_, v_, *block, cu_seqlens=cu_seqlens, backend="triton")

    gold = outputs_and_grads(ref, *gold_inputs)
    ref_bf16 = outputs_and_grads(ref, q, k, v)
    got = outputs_and_grads(kernel, q, k, v)
    for name, a, r, g in zip(["o", "lse", "dq", "dk", "dv"], got, ref_bf16, gold, strict=True):
        err, ref_err = rel_err(a, g), rel_err(r, g)
        assert err <= 2 * ref_err + 1e-6, f"{name}: kernel {err:.2e} vs reference {ref_err:.2e}"


@pytest.mark.gpu
def test_gpu_long_sequence_forward_sampled_rows():
    """T = 262144 with 64 heads of dim 192: offsets pass 2^31 elements (int64 addressing)."""
    block, seqlen = (32, 16), 262144
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_cmp = num_compressed_blocks(seqlen, *block)
    # Scores of std 2: peaked rows, so a row read from the wrong place shows.
    q = 2 * torch.randn(1, seqlen, 64, 192, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, num_cmp, 4, 192, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, num_cmp, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    assert q.numel() > 2**31
    with torch.no_grad():
        o, lse = compressed_attention(q, k, v, *block, backend="triton")
    rows = torch.tensor([0, 30, 31, 47, 1000, 2**17 - 1, 2**17, seqlen - 17, seqlen - 1])
    t = rows.to("cuda")
    mask = torch.arange(num_cmp, device="cuda")[None, :] * block[1] + block[0] - 1 <= t[:, None]
    expected_o, expected_lse = masked_attention(
        q[:, t].float(), k.float(), v.float(), mask, softmax_scale(None, 192)
    )
    torch.testing.assert_close(o[:, t].float(), expected_o, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(lse[:, t], expected_lse, atol=1e-3, rtol=1e-3)
