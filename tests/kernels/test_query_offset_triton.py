"""Queries at an offset into a longer key sequence (`q_offset`), as context parallelism calls
the ops: one call per chunk of queries, against every key up to the chunk's end.

Two checks per op, forward and gradients (q, keys, values; the log-sum-exp too for compressed
attention): the reference at offset o on queries [o, o + T) equals the same rows of the
reference on the whole sequence, and the Triton kernels (interpreted on CPU, fp32) equal the
reference at that offset. Offsets are awkward: inside a compression block, a selection block,
a kernel tile, past the window.
"""

from __future__ import annotations

import pytest
import torch

from nsa_kernels import (
    compressed_attention,
    nsa_attention,
    num_compressed_blocks,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)
from nsa_kernels import reference as ref
from nsa_kernels.compressed_attention import triton_op as cmp_triton
from nsa_kernels.selected_attention import triton_op as slc_triton
from nsa_kernels.selection import triton_op as sel_triton

L, S, LP = 8, 4, 16  # compression block, stride, selection block
SEQ = 77
# (offset, queries): the first chunk, offsets inside blocks and tiles, a single query.
SPANS = [(0, 20), (6, 13), (19, 40), (33, 1), (48, 29)]


def tensors(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in shapes]


def grads_of(out: torch.Tensor | tuple, inputs: list[torch.Tensor], seed: int = 1):
    """[outputs..., d inputs...] for a random linear loss on every (finite) output."""
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum(
        (torch.where(torch.isfinite(o), o, 0.0) * torch.randn(o.shape, generator=gen)).sum()
        for o in outs
    )
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, inputs))


def assert_all_close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4, msg=lambda m, i=i: f"#{i}: {m}")


def check_op(run, q_full, keys_full, offset, count, compressed=()):
    """run(q, keys, compressed, q_offset, backend) on queries [o, o + T) against the same
    rows of the whole-sequence reference, then the Triton backend against the reference."""
    end = offset + count
    blocks = num_compressed_blocks(end, L, S)
    whole = run(q_full, list(keys_full), list(compressed), 0, "reference")
    rows = tuple(o[:, offset:end] for o in (whole if isinstance(whole, tuple) else (whole,)))
    full_grads = grads_of(rows, [q_full, *keys_full, *compressed])[len(rows) :]
    expected = [
        *(o.detach() for o in rows),
        full_grads[0][:, offset:end],
        *(g[:, :end] for g in full_grads[1 : 1 + len(keys_full)]),
        *(g[:, :blocks] for g in full_grads[1 + len(keys_full) :]),
    ]
    for backend in ("reference", "triton"):
        q = q_full[:, offset:end].detach().requires_grad_()
        keys = [t[:, :end].detach().requires_grad_() for t in keys_full]
        cmp = [t[:, :blocks].detach().requires_grad_() for t in compressed]
        got = grads_of(run(q, keys, cmp, offset, backend), [q, *keys, *cmp])
        assert_all_close(got, expected)


@pytest.mark.parametrize("offset,count", SPANS)
@pytest.mark.parametrize("window", [5, 24])
def test_sliding_window(offset, count, window):
    q, k, v = tensors((2, SEQ, 4, 16), (2, SEQ, 2, 16), (2, SEQ, 2, 8))

    def run(q_, keys, _, q_offset, backend):
        return sliding_window_attention(
            q_, *keys, window, q_offset=q_offset, backend=backend
        )

    check_op(run, q, [k, v], offset, count)


@pytest.mark.parametrize("offset,count", SPANS)
def test_compressed_attention(offset, count, monkeypatch):
    # Small tiles: the offset falls inside query tiles and the dK/dV query range is split.
    tiles = cmp_triton.TileConfig(block_t=16, block_n=16, num_stages=1, dkv_splits=3)
    monkeypatch.setattr(cmp_triton, "default_tiles", lambda *args: tiles)
    q, k_cmp, v_cmp = tensors((2, SEQ, 4, 16), (2, 18, 2, 16), (2, 18, 2, 8))

    def run(q_, _, cmp, q_offset, backend):
        return compressed_attention(q_, *cmp, L, S, q_offset=q_offset, backend=backend)

    check_op(run, q, [], offset, count, compressed=[k_cmp, v_cmp])


@pytest.mark.parametrize("offset,count,splits", [(70, 130, 1), (37, 120, 2), (101, 99, 1)])
def test_compressed_attention_unmasked_steps(offset, count, splits, monkeypatch):
    """Longer spans with 16-block steps: the forward, dQ and dK/dV loops run unmasked steps
    whose bounds depend on the offset, between masked ones."""
    tiles = cmp_triton.TileConfig(
        block_t=16, block_n=16, dkv_block_n=16, dkv_block_t=16, num_stages=1, dkv_splits=splits
    )
    monkeypatch.setattr(cmp_triton, "default_tiles", lambda *args: tiles)
    blocks = num_compressed_blocks(offset + count, L, S)
    q, k_cmp, v_cmp = tensors((1, offset + count, 4, 16), (1, blocks, 2, 16), (1, blocks, 2, 8))

    def run(q_, _, cmp, q_offset, backend):
        return compressed_attention(q_, *cmp, L, S, q_offset=q_offset, backend=backend)

    check_op(run, q, [], offset, count, compressed=[k_cmp, v_cmp])


@pytest.mark.parametrize(
    "offset,count,query_block",
    [(o, c, qb) for o, c in SPANS for qb in (1, 2) if o % qb == 0],  # whole query blocks
)
def test_select_blocks(offset, count, query_block):
    q, k = tensors((2, SEQ, 4, 16), (2, SEQ, 2, 16))
    k_cmp = ref.compress_mean(k.detach(), L, S)
    end = offset + count
    blocks = num_compressed_blocks(end, L, S)
    options = {"num_selection_heads": 2, "selection_query_block": query_block}
    whole = select_blocks(q.detach(), k_cmp, L, S, LP, 4, backend="reference", **options)
    for backend in ("reference", "triton"):
        part = select_blocks(
            q.detach()[:, offset:end], k_cmp[:, :blocks], L, S, LP, 4, q_offset=offset,
            backend=backend, **options,
        )
        torch.testing.assert_close(part, whole[:, offset:end], atol=0, rtol=0)


def test_select_blocks_small_kernel_steps(monkeypatch):
    """Steps of one selection block: the offset's first step is past block 0."""
    config = sel_triton.SelectConfig(rows=4, min_width=4, min_blocks=1)
    monkeypatch.setattr(sel_triton, "default_select_config", lambda *args: config)
    q, k = tensors((1, SEQ, 4, 16), (1, SEQ, 2, 16))
    k_cmp = ref.compress_mean(k.detach(), L, S)
    whole = select_blocks(q.detach(), k_cmp, L, S, LP, 3, backend="reference")
    part = select_blocks(
        q.detach()[:, 40:], k_cmp, L, S, LP, 3, q_offset=40, backend="triton"
    )
    torch.testing.assert_close(part, whole[:, 40:], atol=0, rtol=0)


def check_selected_attention(offset, count, monkeypatch, chunk=None, batch=2):
    tiles = slc_triton.TileConfig(block_q=3, dkv_rows=16, dkv_chunk=chunk, num_stages=1)
    monkeypatch.setattr(slc_triton, "default_tiles", lambda *args: tiles)
    q, k, v = tensors((batch, SEQ, 4, 16), (batch, SEQ, 4, 16), (batch, SEQ, 4, 8))
    k_cmp = ref.compress_mean(k.detach(), L, S)
    indices = select_blocks(q.detach(), k_cmp, L, S, LP, 3, num_selection_heads=2)

    def run(q_, keys, _, q_offset, backend):
        rows = indices[:, q_offset : q_offset + q_.shape[1]]
        return selected_attention(q_, *keys, rows, LP, q_offset=q_offset, backend=backend)

    check_op(run, q, [k, v], offset, count)


@pytest.mark.parametrize("offset,count", SPANS)
def test_selected_attention(offset, count, monkeypatch):
    check_selected_attention(offset, count, monkeypatch)


def test_selected_attention_split_query_lists(monkeypatch):
    """Query lists cut into pieces of 6 entries: the dK/dV partial sums at an offset."""
    check_selected_attention(19, 40, monkeypatch, chunk=6, batch=1)


@pytest.mark.parametrize("offset,count", [(0, 20), (19, 40), (48, 29)])
def test_nsa_attention_with_window(offset, count):
    q, k, v, g = tensors((1, SEQ, 4, 16), (1, SEQ, 2, 16), (1, SEQ, 2, 16), (1, SEQ, 4, 3))

    def run(q_, keys, _, q_offset, backend):
        k_, v_, g_ = keys
        k_cmp, v_cmp = ref.compress_mean(k_, L, S), ref.compress_mean(v_, L, S)
        gates = torch.sigmoid(g_[:, q_offset:])
        return nsa_attention(
            q_, k_, v_, k_cmp, v_cmp, gates[..., 0], gates[..., 1], block_size=L, stride=S,
            select_block_size=LP, top_n=3, window_size=10, gate_window=gates[..., 2],
            q_offset=q_offset, backend=backend,
        )

    check_op(run, q, [k, v, g], offset, count)


def test_offset_errors():
    q, k, v = (t.detach() for t in tensors((1, 8, 2, 8), (1, 12, 2, 8), (1, 12, 2, 8)))
    with pytest.raises(ValueError, match="keys hold 12 tokens but q_offset=3 with T=8"):
        sliding_window_attention(q, k, v, 4, q_offset=3)
    with pytest.raises(ValueError, match="q_offset=-1 must be a non-negative integer"):
        sliding_window_attention(q, k, v, 4, q_offset=-1)
    with pytest.raises(ValueError, match="q_offset=4 cannot be combined with cu_seqlens"):
        selected_attention(
            q, k, v, torch.zeros(1, 8, 2, 3, dtype=torch.int32), 4, q_offset=4,
            cu_seqlens=torch.tensor([0, 8]),
        )
    k_cmp = ref.compress_mean(k, 4, 2)  # the blocks of 12 tokens
    message = r"k_cmp has 5 compressed tokens, but T=8 \(q_offset=2\)"
    with pytest.raises(ValueError, match=message):
        compressed_attention(q, k_cmp, k_cmp, 4, 2, q_offset=2)
    with pytest.raises(ValueError, match="q_offset=2 must be a multiple of selection_query"):
        select_blocks(
            q[:, :8], ref.compress_mean(k[:, :10], 4, 2), 4, 2, 8, 3,
            selection_query_block=4, q_offset=2,
        )
