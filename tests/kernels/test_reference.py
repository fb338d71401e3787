"""Property tests of the plain-PyTorch reference: each checks the math against an
independent computation, so a wrong mask, mapping or tie rule fails here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nsa_kernels
from nsa_kernels import reference as ref


def rand(*shape, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=dtype, generator=g)


def causal_attention(q, k, v, scale=None):
    """Full causal attention through torch SDPA (math backend), grouped heads expanded."""
    heads = q.shape[2]
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    v = v.repeat_interleave(heads // v.shape[2], dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    )
    return out.transpose(1, 2)


def qkv(batch=2, seqlen=37, hq=4, hk=2, dk=8, dv=6, seed=0):
    torch.manual_seed(seed)
    return rand(batch, seqlen, hq, dk), rand(batch, seqlen, hk, dk), rand(batch, seqlen, hk, dv)


# --- sliding window -----------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [1, 5, 37])
def test_window_wider_than_sequence_is_full_causal_attention(seqlen):
    q, k, v = qkv(seqlen=seqlen)
    out = nsa_kernels.sliding_window_attention(q, k, v, window_size=seqlen + 3)
    torch.testing.assert_close(out, causal_attention(q, k, v))


def test_window_matches_explicit_loop():
    q, k, v = qkv(batch=1, seqlen=11, hq=2, hk=1)
    w, scale = 3, 0.7
    out = ref.sliding_window_attention(q, k, v, w, scale)
    for t in range(11):
        keys = range(max(0, t - w + 1), t + 1)
        for h in range(2):
            s = torch.stack([q[0, t, h] @ k[0, j, 0] * scale for j in keys])
            p = torch.softmax(s, 0)
            expected = sum(p[i] * v[0, j, 0] for i, j in enumerate(keys))
            torch.testing.assert_close(out[0, t, h], expected)


def test_window_one_attends_to_self_only():
    q, k, v = qkv(hq=2, hk=2)
    torch.testing.assert_close(ref.sliding_window_attention(q, k, v, 1), v)


# --- compression --------------------------------------------------------------------------


def test_mean_compression_with_block_equal_stride_matches_loop():
    x = rand(2, 23, 3, 4)
    out = nsa_kernels.compress_mean(x, block_size=4, stride=4)
    assert out.shape == (2, 5, 3, 4)
    for i in range(5):
        torch.testing.assert_close(out[:, i], x[:, 4 * i : 4 * i + 4].mean(1))


def test_mean_compression_with_overlap_matches_loop():
    x = rand(1, 20, 2, 3)
    out = nsa_kernels.compress_mean(x, block_size=8, stride=4)
    assert out.shape[1] == nsa_kernels.num_compressed_blocks(20, 8, 4) == 4
    for i in range(4):
        torch.testing.assert_close(out[:, i], x[:, 4 * i : 4 * i + 8].mean(1))


def test_sequence_shorter_than_block_has_no_compressed_tokens():
    assert nsa_kernels.compress_mean(rand(1, 3, 2, 4), 4, 2).shape == (1, 0, 2, 4)


def mlp_params(heads, block, dim, hidden, seed=1):
    torch.manual_seed(seed)
    return (
        rand(heads, block, dim), rand(heads, block * dim, hidden) * 0.3, rand(heads, hidden),
        rand(heads, hidden, dim) * 0.3, rand(heads, dim),
    )


def test_mlp_compression_matches_per_block_mlp():
    x = rand(2, 14, 2, 3)
    pos, w1, b1, w2, b2 = mlp_params(2, 4, 3, 5)
    out = nsa_kernels.compress_mlp(x, pos, w1, b1, w2, b2, 4, 2)
    assert out.shape == (2, 6, 2, 3)
    for b in range(2):
        for i in range(6):
            for h in range(2):
                block = (x[b, 2 * i : 2 * i + 4, h] + pos[h]).reshape(-1)
                expected = F.silu(block @ w1[h] + b1[h]) @ w2[h] + b2[h]
                torch.testing.assert_close(out[b, i, h], expected)


# --- compressed attention -----------------------------------------------------------------


def test_one_compressed_block_per_query_by_hand():
    """With T < l + s only block 0 exists; queries before l - 1 see nothing."""
    l, s, seqlen = 4, 2, 5
    q, k, v = qkv(batch=1, seqlen=seqlen, hq=2, hk=1)
    k_cmp, v_cmp = rand(1, 1, 1, 8), rand(1, 1, 1, 6)
    out, lse = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, l, s, scale=0.5)
    assert torch.equal(out[0, : l - 1], torch.zeros_like(out[0, : l - 1]))
    assert torch.isinf(lse[0, : l - 1]).all() and (lse[0, : l - 1] < 0).all()
    for t in range(l - 1, seqlen):
        for h in range(2):
            torch.testing.assert_close(out[0, t, h], v_cmp[0, 0, 0])
            torch.testing.assert_close(lse[0, t, h], q[0, t, h] @ k_cmp[0, 0, 0] * 0.5)


def test_compressed_attention_visibility_rule_by_loop():
    l, s, seqlen = 4, 2, 13
    q, k, v = qkv(batch=1, seqlen=seqlen, hq=2, hk=2)
    k_cmp, v_cmp = nsa_kernels.compress_mean(k, l, s), nsa_kernels.compress_mean(v, l, s)
    out, lse = ref.compressed_attention(q, k_cmp, v_cmp, l, s)
    scale = 1 / math.sqrt(8)
    for t in range(l - 1, seqlen):
        seen = [i for i in range(k_cmp.shape[1]) if i * s + l - 1 <= t]
        for h in range(2):
            scores = torch.stack([q[0, t, h] @ k_cmp[0, i, h] * scale for i in seen])
            torch.testing.assert_close(lse[0, t, h], torch.logsumexp(scores, 0))
            expected = torch.softmax(scores, 0) @ v_cmp[0, seen, h]
            torch.testing.assert_close(out[0, t, h], expected)


def test_rows_without_blocks_have_finite_gradients():
    q, k, v = qkv(batch=1, seqlen=6)
    q.requires_grad_()
    k_cmp = nsa_kernels.compress_mean(k, 4, 2).requires_grad_()
    v_cmp = nsa_kernels.compress_mean(v, 4, 2).requires_grad_()
    out, lse = nsa_kernels.compressed_attention(q, k_cmp, v_cmp, 4, 2)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for t in (q.grad, k_cmp.grad, v_cmp.grad):
        assert torch.isfinite(t).all()
    assert torch.equal(q.grad[0, :3], torch.zeros_like(q.grad[0, :3]))


# --- importance and selection -------------------------------------------------------------


def test_selection_overlap_counts_shared_strides():
    w = ref.selection_overlap(6, 2, block_size=32, stride=16, select_block_size=64)
    expected = torch.tensor([[2, 0], [2, 0], [2, 0], [1, 1], [0, 2], [0, 2]]).float()
    torch.testing.assert_close(w, expected)


def test_importance_sums_over_group_heads_and_overlap():
    l, s, lp = 4, 2, 8
    q, k, _ = qkv(batch=1, seqlen=20, hq=4, hk=4)
    k_cmp = nsa_kernels.compress_mean(k, l, s)
    score = ref.block_importance(q, k_cmp, l, s, lp, num_selection_heads=2)
    assert score.shape == (1, 20, 2, 3)
    _, lse = ref.compressed_attention(q, k_cmp, k_cmp, l, s)
    t, g, j = 17, 1, 1
    total = 0.0
    for h in (2, 3):
        for i in range(k_cmp.shape[1]):
            if i * s + l - 1 > t:
                continue
            overlap = max(0, min(i * s + l, (j + 1) * lp) - max(i * s, j * lp)) / s
            p = torch.exp(q[0, t, h] @ k_cmp[0, i, h] / math.sqrt(8) - lse[0, t, h])
            total = total + p * overlap
    torch.testing.assert_close(score[0, t, g, j], total)


def test_selection_forces_first_and_recent_blocks_and_stays_causal():
    l, s, lp, n = 4, 2, 4, 4
    q, k, _ = qkv(batch=2, seqlen=41, hq=4, hk=2)
    k_cmp = nsa_kernels.compress_mean(k, l, s)
    idx = nsa_kernels.select_blocks(q, k_cmp, l, s, lp, n)
    assert idx.shape == (2, 41, 2, n) and idx.dtype == torch.int32
    for t in range(41):
        current = t // lp
        for row in idx[:, t].reshape(-1, n).tolist():
            chosen = [j for j in row if j >= 0]
            assert chosen == sorted(set(chosen)) and len(chosen) == min(n, current + 1)
            assert max(chosen) <= current
            assert {0, current, max(current - 1, 0)} <= set(chosen)
            assert row[len(chosen) :] == [-1] * (n - len(chosen))


def test_selection_picks_the_most_important_block():
    """A compressed key aligned with every query dominates: its selection block is chosen."""
    l, s, lp = 4, 4, 4
    seqlen, heads, dim = 40, 2, 8
    q = rand(1, seqlen, heads, dim).abs()
    k_cmp = rand(1, seqlen // 4, 1, dim) * 0.01
    k_cmp[0, 4, 0] = 5.0  # block 4 covers tokens [16, 20)
    idx = ref.select_blocks(q, k_cmp, l, s, lp, top_n=4)
    for t in range(24, 40):  # block 4 visible, neither first nor one of the two recent
        assert 4 in idx[0, t, 0].tolist()
    assert idx[0, 39, 0].tolist() == [0, 4, 8, 9]


def test_ties_go_to_the_most_recent_block():
    """Zero scores everywhere (k_cmp = 0 gives uniform p, equal per block): recency wins."""
    l, s, lp = 4, 4, 4
    q = rand(1, 32, 1, 4)
    k_cmp = torch.zeros(1, 8, 1, 4, dtype=torch.float64)
    idx = ref.select_blocks(q, k_cmp, l, s, lp, top_n=4)
    assert idx[0, 31, 0].tolist() == [0, 5, 6, 7]


@pytest.mark.parametrize("seqlen", [13, 40])
def test_top_n_covering_all_blocks_is_full_causal_attention(seqlen):
    l, s, lp = 4, 2, 8
    q, k, v = qkv(seqlen=seqlen)
    k_cmp = nsa_kernels.compress_mean(k, l, s)
    idx = nsa_kernels.select_blocks(q, k_cmp, l, s, lp, top_n=max(3, -(-seqlen // lp)))
    out = nsa_kernels.selected_attention(q, k, v, idx, lp)
    torch.testing.assert_close(out, causal_attention(q, k, v))


def test_selected_attention_matches_gathered_blocks():
    lp = 4
    q, k, v = qkv(batch=1, seqlen=14, hq=2, hk=1)
    block_indices = torch.tensor([0, 2], dtype=torch.int32).expand(1, 14, 1, 2)
    out = ref.selected_attention(q, k, v, block_indices, lp, scale=1.0)
    for t in range(14):
        keys = [j for j in list(range(0, 4)) + list(range(8, 12)) if j <= t]
        for h in range(2):
            p = torch.softmax(torch.stack([q[0, t, h] @ k[0, j, 0] for j in keys]), 0)
            torch.testing.assert_close(out[0, t, h], p @ v[0, keys, 0])


def test_row_with_no_selected_block_is_zero_and_finite():
    q, k, v = qkv(batch=1, seqlen=6, hq=2, hk=2)
    q.requires_grad_()
    idx = torch.full((1, 6, 2, 3), -1, dtype=torch.int32)
    idx[0, 3:, :, 0] = 0
    out = ref.selected_attention(q, k, v, idx, 4)
    out.sum().backward()
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("qb", [2, 4])
def test_query_block_equals_single_query_when_selections_coincide(qb):
    """Queries repeated in aligned groups of qb (qb | s) see the same blocks with the same
    scores, so sharing one selection changes nothing."""
    l, s, lp = 8, 4, 8
    base = rand(2, 40 // qb, 4, 8)
    q = base.repeat_interleave(qb, dim=1)
    k, v = rand(2, 40, 2, 8), rand(2, 40, 2, 6)
    k_cmp, v_cmp = nsa_kernels.compress_mean(k, l, s), nsa_kernels.compress_mean(v, l, s)
    one = ref.select_blocks(q, k_cmp, l, s, lp, 3)
    shared = ref.select_blocks(q, k_cmp, l, s, lp, 3, selection_query_block=qb)
    assert torch.equal(one, shared)
    gates = torch.rand(2, 40, 4, dtype=torch.float64)
    kw = dict(block_size=l, stride=s, select_block_size=lp, top_n=3)
    torch.testing.assert_close(
        ref.nsa_attention(q, k, v, k_cmp, v_cmp, gates, gates, **kw),
        ref.nsa_attention(q, k, v, k_cmp, v_cmp, gates, gates, selection_query_block=qb, **kw),
    )


def test_query_block_shares_one_selection_per_group():
    l, s, lp, qb = 4, 2, 8, 4
    q, k, _ = qkv(batch=1, seqlen=30)
    idx = ref.select_blocks(q, nsa_kernels.compress_mean(k, l, s), l, s, lp, 3, None, qb)
    for start in range(0, 30, qb):
        group = idx[0, start : start + qb]
        assert (group == group[0]).all()


@pytest.mark.parametrize("qb", [1, 2, 4])
def test_selection_and_attention_are_causal(qb):
    """Changing the queries, keys and values of positions > t leaves the selection and the
    output at every position <= t unchanged, query blocks included."""
    l, s, lp, t = 4, 2, 8, 45
    q, k, v = qkv(batch=1, seqlen=64)
    late = torch.arange(64) > t
    q2, k2, v2 = (torch.where(late[None, :, None, None], x + 5 * torch.randn_like(x), x)
                  for x in (q, k, v))
    gates = torch.rand(1, 64, q.shape[2], dtype=q.dtype)
    kw = dict(block_size=l, stride=s, select_block_size=lp, top_n=4, selection_query_block=qb)
    idx, idx2 = (
        ref.select_blocks(q_, nsa_kernels.compress_mean(k_, l, s), l, s, lp, 4, None, qb)
        for q_, k_ in ((q, k), (q2, k2))
    )
    assert torch.equal(idx[:, : t + 1], idx2[:, : t + 1])
    out, out2 = (
        ref.nsa_attention(q_, k_, v_, nsa_kernels.compress_mean(k_, l, s),
                          nsa_kernels.compress_mean(v_, l, s), gates, gates, **kw)
        for q_, k_, v_ in ((q, k, v), (q2, k2, v2))
    )
    torch.testing.assert_close(out[:, : t + 1], out2[:, : t + 1], rtol=0, atol=1e-12)


# --- packed sequences ---------------------------------------------------------------------

LENGTHS = [1, 9, 22, 5]


def packed():
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = qkv(batch=1, seqlen=sum(LENGTHS), seed=3)
    return cu, q, k, v


def per_doc(fn, cu, *tensors):
    return torch.cat(
        [fn(*(t[:, cu[d] : cu[d + 1]] for t in tensors)) for d in range(len(cu) - 1)], dim=1
    )


def test_packed_window_equals_documents_alone():
    cu, q, k, v = packed()
    out = nsa_kernels.sliding_window_attention(q, k, v, 4, cu_seqlens=cu)
    expected = per_doc(lambda *t: nsa_kernels.sliding_window_attention(*t, 4), cu, q, k, v)
    torch.testing.assert_close(out, expected)


def test_packed_global_layer_equals_documents_alone_and_is_isolated():
    l, s, lp = 4, 2, 4
    cu, q, k, v = packed()
    gates = torch.rand(1, q.shape[1], 4, 2, dtype=torch.float64).unbind(-1)
    kw = dict(block_size=l, stride=s, select_block_size=lp, top_n=3, window_size=3)

    def layer(q, k, v, g1, g2, g3, cu_seqlens=None):
        k_cmp = nsa_kernels.compress_mean(k, l, s, cu_seqlens=cu_seqlens)
        v_cmp = nsa_kernels.compress_mean(v, l, s, cu_seqlens=cu_seqlens)
        return ref.nsa_attention(
            q, k, v, k_cmp, v_cmp, g1, g2, gate_window=g3, cu_seqlens=cu_seqlens, **kw
        )

    g3 = torch.rand_like(gates[0])
    out = layer(q, k, v, *gates, g3, cu_seqlens=cu)
    torch.testing.assert_close(out, per_doc(layer, cu, q, k, v, *gates, g3))
    # Changing document 2 leaves every other document's output untouched.
    k2 = k.clone()
    k2[:, cu[2] : cu[3]] = rand(1, LENGTHS[2], 2, 8, seed=9)
    changed = layer(q, k2, v, *gates, g3, cu_seqlens=cu)
    outside = torch.ones(q.shape[1], dtype=torch.bool)
    outside[cu[2] : cu[3]] = False
    torch.testing.assert_close(changed[:, outside], out[:, outside])
    assert not torch.allclose(changed[:, ~outside], out[:, ~outside])


def test_packed_selection_indices_are_document_relative():
    l, s, lp = 4, 2, 4
    cu, q, k, _ = packed()
    k_cmp = nsa_kernels.compress_mean(k, l, s, cu_seqlens=cu)
    idx = nsa_kernels.select_blocks(q, k_cmp, l, s, lp, 3, cu_seqlens=cu)
    expected = per_doc(
        lambda q_, k_: ref.select_blocks(q_, nsa_kernels.compress_mean(k_, l, s), l, s, lp, 3),
        cu, q, k,
    )
    assert torch.equal(idx, expected)
    assert idx[0, int(cu[2])].tolist()[0] == [0, -1, -1]


# --- gradients ----------------------------------------------------------------------------


def leaves(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


@pytest.mark.parametrize("seqlen,window", [(1, 2), (7, 3), (9, 20)])
def test_gradcheck_window(seqlen, window):
    q, k, v = leaves(*qkv(batch=2, seqlen=seqlen, hq=2, hk=1, dk=3, dv=2))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ref.sliding_window_attention(q, k, v, window), (q, k, v)
    )


def test_gradcheck_compression():
    (x,) = leaves(rand(1, 9, 2, 3))
    params = leaves(*mlp_params(2, 4, 3, 4))
    assert torch.autograd.gradcheck(lambda x: ref.compress_mean(x, 4, 2), (x,))
    assert torch.autograd.gradcheck(
        lambda x, *p: ref.compress_mlp(x, *p, 4, 2), (x, *params)
    )


def test_gradcheck_compressed_attention():
    q, k, v = qkv(batch=2, seqlen=10, hq=2, hk=1, dk=3, dv=2)
    q, k_cmp, v_cmp = leaves(q, ref.compress_mean(k, 4, 2), ref.compress_mean(v, 4, 2))

    def fn(q, k_cmp, v_cmp):
        out, lse = ref.compressed_attention(q, k_cmp, v_cmp, 4, 2)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k_cmp, v_cmp))


def test_gradcheck_selected_attention():
    q, k, v = qkv(batch=2, seqlen=11, hq=2, hk=1, dk=3, dv=2)
    idx = ref.select_blocks(q, ref.compress_mean(k, 4, 2), 4, 2, 4, 3)
    q, k, v = leaves(q, k, v)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ref.selected_attention(q, k, v, idx, 4), (q, k, v)
    )


def test_gradcheck_nsa_attention_with_packed_documents():
    cu = torch.tensor([0, 3, 12], dtype=torch.int32)
    q, k, v = qkv(batch=1, seqlen=12, hq=2, hk=1, dk=3, dv=2)
    gates = torch.rand(1, 12, 2, 3, dtype=torch.float64).unbind(-1)
    inputs = leaves(q, k, v, *gates)

    def fn(q, k, v, g1, g2, g3):
        k_cmp = ref.compress_mean(k, 4, 2, cu)
        v_cmp = ref.compress_mean(v, 4, 2, cu)
        return ref.nsa_attention(
            q, k, v, k_cmp, v_cmp, g1, g2, block_size=4, stride=2, select_block_size=4,
            top_n=3, window_size=2, gate_window=g3, cu_seqlens=cu,
        )

    assert torch.autograd.gradcheck(fn, inputs)


# --- input checks -------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(batch=1, seqlen=8)
    with pytest.raises(ValueError, match="backend='bogus'"):
        nsa_kernels.sliding_window_attention(q, k, v, 2, backend="bogus")
    with pytest.raises(ValueError, match="window_size=0"):
        nsa_kernels.sliding_window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="k heads"):
        nsa_kernels.sliding_window_attention(q, rand(1, 8, 3, 8), rand(1, 8, 3, 6), 2)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=8"):
        nsa_kernels.sliding_window_attention(q, k, v, 2, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="stride=3 must divide block_size=4"):
        nsa_kernels.compress_mean(k, 4, 3)
    with pytest.raises(ValueError, match="k_cmp has 2 compressed tokens"):
        nsa_kernels.compressed_attention(q, rand(1, 2, 2, 8), rand(1, 2, 2, 6), 4, 2)
    k_cmp = ref.compress_mean(k, 4, 2)
    with pytest.raises(ValueError, match="top_n=2 must be >= 3"):
        nsa_kernels.select_blocks(q, k_cmp, 4, 2, 4, 2)
    with pytest.raises(ValueError, match="block_size=8 must be <= select_block_size=4"):
        nsa_kernels.select_blocks(q, ref.compress_mean(k, 8, 2), 8, 2, 4, 3)
    with pytest.raises(ValueError, match="selection_query_block=3 must divide"):
        nsa_kernels.select_blocks(q, k_cmp, 4, 2, 4, 3, selection_query_block=3)
    with pytest.raises(ValueError, match="num_selection_heads=3 must divide"):
        nsa_kernels.select_blocks(q, k_cmp, 4, 2, 4, 3, num_selection_heads=3)
    with pytest.raises(ValueError, match="block_indices must be an integer"):
        nsa_kernels.selected_attention(q, k, v, torch.zeros(1, 8, 2, 3), 4)
    with pytest.raises(ValueError, match="gate_cmp must be"):
        g = torch.rand(1, 8, 4, dtype=torch.float64)
        nsa_kernels.nsa_attention(
            q, k, v, k_cmp, k_cmp, g[:, :4], g, block_size=4, stride=2,
            select_block_size=4, top_n=3,
        )
