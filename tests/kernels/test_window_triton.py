"""Triton sliding-window attention against the plain-PyTorch reference: output and the
gradients of q, k and v.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py) on fp32 CPU tensors
with awkward shapes: lengths that are not multiples of any tile, T = 1, T < window, grouped
heads, DK != DV (power of two or not), batch 2, packed documents, and tile shapes that make
every loop (masked and unmasked KV blocks, query tiles, heads of a group) run. The `gpu` tests
hold the bf16 kernels to at most twice the error of the bf16 reference against a float64
reference at long lengths, computed in query chunks.
"""

from __future__ import annotations

import pytest
import torch

from nsa_kernels import sliding_window_attention
from nsa_kernels.utils import masked_attention, softmax_scale
from nsa_kernels.window import reference, triton_op

# (T, window, (HQ, HK), (DK, DV), batch): every length, window, head grouping and dim pair
# appears several times, with windows of 1, below, at and beyond the tile sizes and T.
CASES = [
    (1, 1, (4, 1), (16, 8), 2),
    (1, 16, (2, 2), (24, 16), 1),
    (7, 1, (4, 2), (32, 32), 1),
    (7, 5, (4, 1), (24, 16), 2),
    (7, 16, (2, 2), (16, 8), 1),
    (37, 1, (2, 2), (16, 8), 1),
    (37, 5, (4, 2), (16, 8), 2),
    (37, 16, (4, 1), (32, 32), 1),
    (37, 100, (4, 2), (24, 16), 1),
    (100, 5, (2, 2), (32, 32), 1),
    (100, 16, (4, 2), (24, 16), 1),
    (100, 40, (4, 1), (16, 8), 1),
    (100, 64, (2, 2), (24, 16), 1),
    (100, 1000, (4, 1), (24, 16), 1),
]


def make_inputs(
    batch: int,
    seqlen: int,
    heads: tuple[int, int],
    dims: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaf tensors q [B, T, HQ, DK], k [B, T, HK, DK], v [B, T, HK, DV]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    (hq, hk), (dk, dv) = heads, dims
    shapes = [(batch, seqlen, hq, dk), (batch, seqlen, hk, dk), (batch, seqlen, hk, dv)]
    return tuple(
        torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
        for shape in shapes
    )


def outputs_and_grads(fn, q, k, v, seed: int = 1) -> list[torch.Tensor]:
    """[o, dq, dk, dv] for a random linear loss of the output."""
    o = fn(q, k, v)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o)
    return [o, *torch.autograd.grad(o, (q, k, v), do)]


def assert_matches_reference(q, k, v, window, cu_seqlens=None, scale=None, atol=1e-4):
    got = outputs_and_grads(
        lambda *x: sliding_window_attention(
            *x, window, scale=scale, cu_seqlens=cu_seqlens, backend="triton"
        ),
        q,
        k,
        v,
    )
    want = outputs_and_grads(
        lambda *x: reference.sliding_window_attention(*x, window, scale, cu_seqlens), q, k, v
    )
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def chunked_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    do: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk: int = 1024,
) -> list[torch.Tensor]:
    """Reference output (and with `do`: dq, dk, dv) at any length, without a T x T mask.

    Queries [s, e) of a document only see its keys [s - w + 1, e), so each chunk of queries
    is the reference math on a [chunk, chunk + w - 1] slice. Gradients are summed over chunks
    in at least fp32 and rounded to the input dtype once, as one matrix product would be.
    """
    scale = softmax_scale(None, q.shape[-1])
    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    o = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    wide = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = (torch.zeros(x.shape, dtype=wide, device=x.device) for x in (q, k, v))
    for doc_start, doc_end in zip(bounds[:-1], bounds[1:], strict=True):
        for start in range(doc_start, doc_end, chunk):
            end = min(start + chunk, doc_end)
            key_start = max(doc_start, start - window + 1)
            rows, keys = slice(start, end), slice(key_start, end)
            parts = [x.detach().requires_grad_(do is not None) for x in (q, k, v)]
            q_c, k_c, v_c = parts[0][:, rows], parts[1][:, keys], parts[2][:, keys]
            t = torch.arange(start, end, device=q.device)[:, None]
            j = torch.arange(key_start, end, device=q.device)[None, :]
            out = masked_attention(q_c, k_c, v_c, (j <= t) & (j > t - window), scale)[0]
            o[:, rows] = out.detach()
            if do is not None:
                grads = torch.autograd.grad(out, (q_c, k_c, v_c), do[:, rows])
                dq[:, rows] += grads[0]
                dk[:, keys] += grads[1]
                dv[:, keys] += grads[2]
    if do is None:
        return [o]
    return [o, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)]


def errors(x: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative L2 error) of x against truth; L2 is absolute if truth is 0."""
    diff = x.double() - truth.double()
    norm = truth.double().norm().item()
    return diff.abs().max().item(), diff.norm().item() / (norm if norm > 0 else 1.0)


def assert_within_reference_error(got, ref_low, truth, names=("o", "dq", "dk", "dv")):
    """The kernel's error is at most ~2x that of the reference run in the same low precision."""
    for name, g, r, t in zip(names, got, ref_low, truth, strict=True):
        (g_max, g_rel), (r_max, r_rel) = errors(g, t), errors(r, t)
        assert g_max <= 2 * r_max + 1e-4, f"{name}: max abs {g_max:.3e} vs reference {r_max:.3e}"
        assert g_rel <= 2 * r_rel + 1e-4, f"{name}: rel L2 {g_rel:.3e} vs reference {r_rel:.3e}"


# --- CPU (interpreter) --------------------------------------------------------------------


@pytest.mark.parametrize("seqlen, window, heads, dims, batch", CASES)
def test_matches_reference(seqlen, window, heads, dims, batch):
    q, k, v = make_inputs(batch, seqlen, heads, dims)
    assert_matches_reference(q, k, v, window)


@pytest.mark.parametrize(
    "lengths, window", [([11, 1, 25], 5), ([1, 40, 20], 16), ([3, 70, 1], 100)]
)
def test_packed_documents(lengths, window):
    """Documents never attend across boundaries, whatever the window."""
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    q, k, v = make_inputs(1, sum(lengths), (4, 2), (24, 16))
    assert_matches_reference(q, k, v, window, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize(
    "tiles",
    [
        triton_op.Tiles(16, 32, 1, 1),  # key steps wider than query tiles
        triton_op.Tiles(64, 16, 1, 1),  # query tiles spanning several documents
    ],
)
@pytest.mark.parametrize("packed", [False, True])
def test_tile_shapes(monkeypatch, tiles, packed):
    """Window edges and document starts inside tiles; with w = 80 every kernel also takes
    its unmasked path (blocks that all rows of a tile see)."""
    blocks = triton_op.Blocks(tiles, tiles, tiles)
    monkeypatch.setattr(triton_op, "block_config", lambda *args: blocks)
    cu_seqlens = torch.tensor([0, 3, 4, 110, 130], dtype=torch.int32) if packed else None
    q, k, v = make_inputs(1, 130, (2, 1), (16, 8))
    assert_matches_reference(q, k, v, 80, cu_seqlens=cu_seqlens)


def test_scale_and_strided_inputs():
    """A custom scale; q, k views of one fused projection ([B, T, 2, H, D]) and a v whose
    head dim is not contiguous."""
    gen = torch.Generator().manual_seed(3)
    qk = torch.randn(2, 45, 2, 2, 16, generator=gen).requires_grad_()
    v_t = torch.randn(2, 45, 8, 2, generator=gen).requires_grad_()  # [B, T, DV, H]
    q, k = qk.unbind(2)
    assert_matches_reference(q, k, v_t.transpose(2, 3), 9, scale=0.3)


def test_half_precision_within_reference_error():
    """fp16 (the interpreter has no bf16 dot): low-precision P and dS casts keep the kernel
    within twice the error of the fp16 reference against a float64 one."""
    q, k, v = make_inputs(1, 63, (4, 2), (24, 16), dtype=torch.float16)
    do = torch.randn(1, 63, 4, 16, generator=torch.Generator().manual_seed(1)).half()
    o = sliding_window_attention(q, k, v, 16, backend="triton")
    got = [o, *torch.autograd.grad(o, (q, k, v), do)]
    ref_half = chunked_reference(q, k, v, 16, do)
    truth = chunked_reference(*(x.double() for x in (q, k, v)), 16, do.double())
    assert_within_reference_error(got, ref_half, truth)


def test_latent_absorbed_dims():
    """DK = 576 (split 512 + 64), DV = 512: the absorbed-MLA shape."""
    q, k, v = make_inputs(1, 40, (2, 1), (576, 512))
    assert_matches_reference(q, k, v, 9)


def test_rejects_too_large_head_dim():
    q = torch.zeros(1, 4, 1, triton_op.MAX_HEAD_DIM + 1)
    v = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="head dims up to"):
        sliding_window_attention(q, q, v, 2, backend="triton")


def test_empty_sequence():
    q, k, v = make_inputs(1, 0, (2, 1), (16, 8))
    o = sliding_window_attention(q, k, v, 4, backend="triton")
    assert o.shape == (1, 0, 2, 8)


# --- GPU ----------------------------------------------------------------------------------


def gpu_case(seqlen, heads, window, cu_seqlens=None):
    """bf16 kernel outputs and grads, the bf16 reference's, and the float64 truth."""
    dims = (192, 128)
    q, k, v = make_inputs(1, seqlen, heads, dims, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(1, seqlen, heads[0], dims[1], generator=gen, device="cuda").bfloat16()
    o = sliding_window_attention(q, k, v, window, cu_seqlens=cu_seqlens, backend="triton")
    got = [o, *torch.autograd.grad(o, (q, k, v), do)]
    ref_bf16 = chunked_reference(q, k, v, window, do, cu_seqlens)
    wide = [x.double() for x in (q, k, v, do)]
    truth = chunked_reference(*wide[:3], window, wide[3], cu_seqlens)
    return got, ref_bf16, truth


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(16, 16), (16, 2)])
@pytest.mark.parametrize("seqlen", [1, 63, 1000, 4097, 65536])
def test_gpu_bf16_matches_reference(seqlen, heads):
    assert_within_reference_error(*gpu_case(seqlen, heads, window=512))


@pytest.mark.gpu
def test_gpu_packed_documents():
    lengths = [1000, 1, 2999, 97]
    cu_seqlens = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    assert_within_reference_error(*gpu_case(sum(lengths), (16, 2), 512, cu_seqlens))


@pytest.mark.gpu
def test_gpu_long_sequence_offsets():
    """T = 262144 with 64 heads of 192: element offsets of q and k pass 2**31; sampled rows
    (both ends, the middle, every third head) against a direct computation of those rows."""
    seqlen, window, heads, dims = 262144, 512, (64, 64), (192, 128)
    with torch.no_grad():
        q, k, v = (x.detach() for x in make_inputs(1, seqlen, heads, dims, torch.bfloat16, "cuda"))
        o = sliding_window_attention(q, k, v, window, backend="triton")
        scale = softmax_scale(None, dims[0])
        got, ref_bf16, truth = [], [], []
        for t in [0, 1, 511, 512, 70001, seqlen // 2 + 3, seqlen - 2, seqlen - 1]:
            rows, keys = slice(t, t + 1), slice(max(0, t - window + 1), t + 1)
            visible = torch.ones(1, 1, dtype=torch.bool, device="cuda")
            for dtype, out in ((torch.bfloat16, ref_bf16), (torch.float64, truth)):
                q_t, k_t, v_t = q[:, rows].to(dtype), k[:, keys].to(dtype), v[:, keys].to(dtype)
                out.append(masked_attention(q_t, k_t, v_t, visible, scale)[0][0, 0, ::3])
            got.append(o[0, t, ::3])
    rows_of = [torch.stack(x) for x in (got, ref_bf16, truth)]  # [8, 22, DV] each
    assert_within_reference_error(*([x] for x in rows_of), names=["sampled rows of o"])
