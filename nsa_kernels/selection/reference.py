"""Block importance and top-n selection (NSA Eq. 8-10).

p_cmp[t, i] = softmax over the compressed blocks i visible to query t (Eq. 8).
Selection block j covers tokens [j*l', (j+1)*l'). Each compression block adds its
probability to every selection block it overlaps, weighted by the overlap counted in
strides (Eq. 9 with s | l and s | l'). The heads that share one selection (a GQA KV head,
or a GLA latent head) sum their scores (Eq. 10). Then each query keeps the top n blocks
among those it may see (j <= t // l'), always including block 0 and the two most recent
blocks; ties go to the more recent block. With `selection_query_block` q > 1, the q
consecutive queries [m*q, (m+1)*q) share the selection of their first query m*q: it is the
only member whose scores are causal for all of them (summing the members' scores, as some
NSA implementations do, lets query m*q see the queries of later tokens). q divides l', so the
members share the current block too. With `q_offset` o the queries sit at positions o + i
(o a multiple of q, so query blocks stay whole).
"""

from __future__ import annotations

import torch

from ..compressed_attention.reference import visible_blocks
from ..utils import compressed_cu_seqlens, masked_softmax, per_document, softmax_scale


def selection_overlap(
    num_cmp_blocks: int,
    num_slc_blocks: int,
    block_size: int,
    stride: int,
    select_block_size: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """[N, M] overlap of compression block i with selection block j, in strides."""
    i = torch.arange(num_cmp_blocks, device=device)[:, None]
    j = torch.arange(num_slc_blocks, device=device)[None, :]
    lo = torch.maximum(i * stride, j * select_block_size)
    hi = torch.minimum(i * stride + block_size, (j + 1) * select_block_size)
    return (hi - lo).clamp(min=0).float() / stride


def block_importance(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    select_block_size: int,
    num_selection_heads: int | None = None,
    scale: float | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """q [B, T, HQ, DK], k_cmp [B, N, HK, DK] -> scores [B, T, HI, M], M = ceil((o + T) / l')."""
    batch, seqlen, heads, _ = q.shape
    groups = num_selection_heads or k_cmp.shape[2]
    scale = softmax_scale(scale, q.shape[-1])
    k_cmp = k_cmp.repeat_interleave(heads // k_cmp.shape[2], dim=2)
    scores = torch.einsum("bthd,bnhd->bhtn", q, k_cmp) * scale  # [B, HQ, T, N]
    mask = visible_blocks(seqlen, k_cmp.shape[1], block_size, stride, q.device, q_offset)
    p_cmp, _ = masked_softmax(scores, mask)  # [B, HQ, T, N]
    num_slc = -(-(q_offset + seqlen) // select_block_size)
    overlap = selection_overlap(
        k_cmp.shape[1], num_slc, block_size, stride, select_block_size, q.device
    ).to(p_cmp.dtype)
    p_slc = p_cmp @ overlap  # [B, HQ, T, M]
    p_slc = p_slc.view(batch, groups, heads // groups, seqlen, num_slc).sum(2)  # [B, HI, T, M]
    return p_slc.transpose(1, 2)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    block_size: int,
    stride: int,
    select_block_size: int,
    top_n: int,
    num_selection_heads: int | None = None,
    selection_query_block: int = 1,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Indices [B, T, HI, n] (int32) of the selected blocks, ascending, padded with -1.

    With packed sequences the indices count blocks from the start of each document.
    `lse` (compressed attention's log-sum-exp) is accepted for parity with the kernel, which
    reuses it; the reference recomputes the softmax and ignores it.
    """
    if cu_seqlens is not None:
        cu_cmp = compressed_cu_seqlens(cu_seqlens, block_size, stride)
        return per_document(
            lambda q_, k_: select_blocks(
                q_, k_, block_size, stride, select_block_size, top_n,
                num_selection_heads, selection_query_block, scale,
            ),
            [cu_seqlens, cu_cmp],
            [q, k_cmp],
        )
    with torch.no_grad():
        score = block_importance(
            q, k_cmp, block_size, stride, select_block_size, num_selection_heads, scale, q_offset
        )  # [B, T, HI, M]
        return _top_n(score, select_block_size, top_n, selection_query_block, q_offset)


def _top_n(
    score: torch.Tensor,
    select_block_size: int,
    top_n: int,
    selection_query_block: int,
    q_offset: int = 0,
) -> torch.Tensor:
    seqlen, num_slc = score.shape[1], score.shape[3]
    qb = selection_query_block
    if qb > 1:  # every member takes the scores of its block's first query
        score = score[:, ::qb].repeat_interleave(qb, dim=1)[:, :seqlen]
    t = q_offset + torch.arange(seqlen, device=score.device)[:, None]  # [T, 1] positions
    current = t // select_block_size
    j = torch.arange(num_slc, device=score.device)[None, :]  # [1, M]
    causal = (j <= current)[None, :, None, :]  # [1, T, 1, M]
    forced = (j == 0) | (j == current) | (j == current - 1)
    score = score.masked_fill(forced[None, :, None, :], float("inf"))
    score = score.masked_fill(~causal, float("-inf"))
    # Stable sort over reversed block order: among equal scores the most recent block wins.
    order = torch.sort(score.flip(-1), dim=-1, descending=True, stable=True).indices
    picked = (num_slc - 1 - order)[..., :top_n]  # [B, T, HI, min(n, M)]
    valid = torch.gather(causal.expand_as(score), -1, picked)
    picked = torch.where(valid, picked, num_slc).sort(dim=-1).values
    picked = torch.where(picked == num_slc, -1, picked)
    if picked.shape[-1] < top_n:
        picked = torch.nn.functional.pad(picked, (0, top_n - picked.shape[-1]), value=-1)
    return picked.to(torch.int32)
