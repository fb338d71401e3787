"""Attention math of the ASA Hugging Face model in plain PyTorch (part of the exported code).

The same rules as nsa_kernels' reference ops, written for queries at arbitrary positions so
that one implementation serves a whole sequence and a decoding step: masked softmax
attention with grouped heads, the causal rule of compressed blocks, block importance (NSA
Eq. 8-10), top-n selection, and rotary embeddings. Tensors are [B, T, heads, dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where `mask` allows, in at least float32; rows without any
    allowed entry give zeros (no NaN)."""
    mask = mask.expand_as(scores)
    has_key = mask.any(dim=-1, keepdim=True)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    return torch.exp(scores - torch.logsumexp(scores, dim=-1, keepdim=True)) * has_key


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, HQ, DK], k [B, S, HK, DK], v [B, S, HK, DV], mask broadcastable to
    [B, HQ, T, S] -> (o [B, T, HQ, DV], probs [B, HQ, T, S]); query head h reads KV head
    h // (HQ / HK)."""
    heads = q.shape[2]
    k = k.repeat_interleave(heads // k.shape[2], dim=2)
    v = v.repeat_interleave(heads // v.shape[2], dim=2)
    probs = masked_softmax(torch.einsum("bthd,bshd->bhts", q, k) * scale, mask)
    return torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v), probs


def num_compressed_blocks(
    length: torch.Tensor | int, block: int, stride: int
) -> torch.Tensor | int:
    """Complete compression blocks [i*s, i*s + l) among `length` tokens."""
    if isinstance(length, int):
        return 0 if length < block else (length - block) // stride + 1
    full = torch.div(length - block, stride, rounding_mode="floor") + 1
    return torch.where(length < block, 0, full)


def selection_overlap(
    num_cmp: int, num_slc: int, block: int, stride: int, slc_block: int, device: torch.device
) -> torch.Tensor:
    """[N, M]: strides shared by compression block i and selection block j (NSA Eq. 9)."""
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_slc, device=device)[None, :]
    lo = torch.maximum(i * stride, j * slc_block)
    hi = torch.minimum(i * stride + block, (j + 1) * slc_block)
    return (hi - lo).clamp(min=0).float() / stride


def selection_scores(
    p_cmp: torch.Tensor, num_slc: int, block: int, stride: int, slc_block: int
) -> torch.Tensor:
    """p_cmp [..., N] @ selection_overlap(N, M, ...) -> [..., M] without the [N, M] matrix:
    block [i*s, i*s + l) with l <= l' overlaps at most selection blocks j0 = i*s // l' and
    j0 + 1. For decoding steps at long context, where N * M would be large."""
    start = torch.arange(p_cmp.shape[-1], device=p_cmp.device) * stride
    first = start // slc_block
    in_first = (torch.minimum((first + 1) * slc_block, start + block) - start) / stride
    out = p_cmp.new_zeros(*p_cmp.shape[:-1], num_slc + 1)
    out.scatter_add_(-1, first.expand_as(p_cmp), p_cmp * in_first.to(p_cmp.dtype))
    second = (first + 1).clamp(max=num_slc).expand_as(p_cmp)
    out.scatter_add_(-1, second, p_cmp * (block / stride - in_first).to(p_cmp.dtype))
    return out[..., :num_slc]


def top_n_blocks(
    score: torch.Tensor, positions: torch.Tensor, slc_block: int, top_n: int
) -> torch.Tensor:
    """score [B, T, HI, M] of the queries at positions [B, T] -> indices [B, T, HI, n] of the
    selected blocks, ascending, -1 padded. Blocks j <= t // l' only; block 0 and the two
    most recent are always kept; ties go to the more recent block."""
    num_slc = score.shape[-1]
    current = (positions // slc_block)[:, :, None, None]  # [B, T, 1, 1]
    j = torch.arange(num_slc, device=score.device)
    causal = j <= current
    forced = (j == 0) | (j == current) | (j == current - 1)
    score = score.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    order = torch.sort(score.flip(-1), dim=-1, descending=True, stable=True).indices
    picked = (num_slc - 1 - order)[..., :top_n]
    valid = torch.gather(causal.expand_as(score), -1, picked)
    picked = torch.where(valid, picked, num_slc).sort(dim=-1).values
    picked = torch.where(picked == num_slc, -1, picked)
    return F.pad(picked, (0, top_n - picked.shape[-1]), value=-1)


@dataclass
class SelectionCarry:
    """Scores of the selection query block that continues in the next forward."""

    group: torch.Tensor
    """[B] index of the query block (position // selection_query_block); -1 for none."""

    score: torch.Tensor
    """[B, HI, M] scores of its first query (zero while that query has not been seen)."""


def share_over_query_blocks(
    score: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    query_block: int,
    carry: SelectionCarry | None,
) -> tuple[torch.Tensor, SelectionCarry]:
    """Give every query of a block of `query_block` consecutive positions the scores
    [B, T, HI, M] of the block's first query, so they share its selection causally, as the
    kernels do in training (padding contributes nothing).

    A block whose first query came in an earlier forward takes that query's scores from
    `carry`. Returns the shared scores and the carry for the next forward."""
    batch, _, heads, num_slc = score.shape
    first_query = valid & (positions % query_block == 0)  # [B, T]
    score = score.masked_fill(~first_query[:, :, None, None], 0.0)
    group = torch.div(positions, query_block, rounding_mode="floor")  # [B, T]
    first = group[:, :1]
    rel = (group - first).clamp(min=0)
    index = rel[:, :, None, None].expand_as(score)
    sums = score.new_zeros(batch, int(rel.max()) + 1, heads, num_slc).scatter_add_(1, index, score)
    if carry is not None:
        past = F.pad(carry.score, (0, num_slc - carry.score.shape[-1]))
        sums[:, 0] += past * (carry.group[:, None] == first).to(past.dtype)[..., None]
    shared = sums.gather(1, index)
    last = torch.where(valid, torch.arange(valid.shape[1], device=valid.device), -1).amax(1)
    has_token = last >= 0
    last_rel = rel.gather(1, last.clamp(min=0)[:, None])[:, 0]
    new_group = torch.where(has_token, group.gather(1, last.clamp(min=0)[:, None])[:, 0], -1)
    new_score = sums[torch.arange(batch, device=score.device), last_rel]
    if carry is not None:
        old = F.pad(carry.score, (0, num_slc - carry.score.shape[-1]))
        new_group = torch.where(has_token, new_group, carry.group)
        new_score = torch.where(has_token[:, None, None], new_score, old)
    return shared, SelectionCarry(new_group, new_score)


def positions_of_blocks(indices: torch.Tensor, slc_block: int) -> torch.Tensor:
    """Selected block indices [..., n] -> token positions [..., n * l'] (-1 for no block)."""
    offsets = torch.arange(slc_block, device=indices.device)
    pos = indices[..., None] * slc_block + offsets
    return torch.where(indices[..., None] >= 0, pos, -1).flatten(-2)


def gather_positions(store: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """store [B, S, *rest], positions [B, *index] -> [B, *index, *rest]; positions outside
    [0, S) read an arbitrary stored token (callers mask them)."""
    batch = store.shape[0]
    flat = positions.clamp(0, store.shape[1] - 1).reshape(batch, -1)
    rows = torch.arange(batch, device=store.device)[:, None]
    return store[rows, flat].reshape(*positions.shape, *store.shape[2:])


def gather_per_head(store: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """store [B, S, HS, D], positions [B, T, HS, P] -> [B, T, HS, P, D]: head j's tokens at its
    own positions; positions outside [0, S) read an arbitrary stored token (callers mask them)."""
    batch, length, heads, dim = store.shape
    head = torch.arange(heads, device=store.device)[None, None, :, None]
    flat = (positions.clamp(0, length - 1) * heads + head).reshape(batch, -1, 1).expand(-1, -1, dim)
    return store.reshape(batch, length * heads, dim).gather(1, flat).reshape(*positions.shape, dim)


def rope_cos_sin(
    positions: torch.Tensor, dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, 1, dim] (float32) at positions [B, T]: rotate-half RoPE with
    frequencies base^(-2i/dim), as Megatron's RotaryEmbedding."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    )
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [B, T, H, d]; keep the rest."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rot = rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


def pack(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Compacted rows [B, T, ...] -> one packed sequence [1, sum(lengths), ...]."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x[keep][None]


def unpack(x: torch.Tensor, lengths: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of `pack` (zeros where rows are shorter than `length`)."""
    keep = torch.arange(length, device=x.device)[None, :] < lengths[:, None]
    out = x.new_zeros(lengths.shape[0], length, *x.shape[2:])
    out[keep] = x[0]
    return out


def packed_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """cu_seqlens of the packed sequence: [0, l_0, l_0 + l_1, ...] (int32)."""
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
