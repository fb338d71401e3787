"""Helpers shared by every op: input checks, backend choice, packed-sequence layout and the
masked softmax attention that all reference ops reduce to."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("auto", "triton", "reference")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed: {', '.join(BACKENDS)}")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run: asked for, or `auto` with CUDA inputs."""
    check_backend(backend)
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def check_blocks(block_size: int, stride: int, select_block_size: int | None = None) -> None:
    """Compression blocks of length l with stride s; selection blocks of size l' (NSA Eq. 9)."""
    check_positive("block_size", block_size)
    check_positive("stride", stride)
    if block_size % stride:
        raise ValueError(f"stride={stride} must divide block_size={block_size}")
    if select_block_size is not None:
        check_positive("select_block_size", select_block_size)
        if select_block_size % stride:
            raise ValueError(f"stride={stride} must divide select_block_size={select_block_size}")
        if block_size > select_block_size:
            raise ValueError(
                f"block_size={block_size} must be <= select_block_size={select_block_size}"
            )


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    same_length: bool = True,
) -> None:
    """q [B, T, HQ, DK], k [B, S, HK, DK], v [B, S, HK, DV] with HK dividing HQ."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(t.shape)}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"batch/length/heads of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "do not match"
        )
    if same_length and q.shape[1] != k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} tokens but k has {k.shape[1]}; they must be equal")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"k heads ({k.shape[2]}) must divide q heads ({q.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, q: torch.Tensor) -> None:
    """Packed sequences: B == 1 and cu_seqlens = [0, ..., T], non-decreasing."""
    if cu_seqlens is None:
        return
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with >= 2 entries, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if q.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[1]:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={q.shape[1]}, got {bounds}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")


def check_q_offset(
    q_offset: int, cu_seqlens: torch.Tensor | None, q_len: int, key_len: int | None = None
) -> None:
    """`q_offset` o: query i sits at position o + i of a key sequence that holds positions
    0..o+T-1 (the queries are its last T positions). Not combined with packed sequences."""
    if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise ValueError(f"q_offset={q_offset!r} must be a non-negative integer")
    if q_offset and cu_seqlens is not None:
        raise ValueError(
            f"q_offset={q_offset} cannot be combined with cu_seqlens; call the op once per "
            "document"
        )
    if key_len is not None and key_len != q_offset + q_len:
        raise ValueError(
            f"keys hold {key_len} tokens but q_offset={q_offset} with T={q_len} queries "
            f"needs q_offset + T = {q_offset + q_len}"
        )


def softmax_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def num_compressed_blocks(length: int, block_size: int, stride: int) -> int:
    """Complete compression blocks [i*s, i*s + l) inside a sequence of `length` tokens."""
    return 0 if length < block_size else (length - block_size) // stride + 1


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """Offsets of each document's compressed tokens when documents are compressed one by one."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    counts = [num_compressed_blocks(n, block_size, stride) for n in lengths]
    out = torch.zeros(len(counts) + 1, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    out[1:] = torch.tensor(counts, dtype=cu_seqlens.dtype).cumsum(0)
    return out


def per_document(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    offsets: Sequence[torch.Tensor],
    tensors: Sequence[torch.Tensor],
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run `fn` on each packed document alone and concatenate along the token axis.

    `tensors[i]` is split by `offsets[i]` (cu_seqlens for token tensors, the compressed
    offsets for compressed tensors); every output of `fn` is token-aligned ([1, T, ...]).
    """
    n_docs = offsets[0].numel() - 1
    results = []
    for d in range(n_docs):
        parts = [t[:, int(o[d]) : int(o[d + 1])] for t, o in zip(tensors, offsets, strict=True)]
        results.append(fn(*parts))
    if isinstance(results[0], tuple):
        return tuple(torch.cat(r, dim=1) for r in zip(*results, strict=True))
    return torch.cat(results, dim=1)


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, HK, D] -> [B, S, heads, D]: head h reads KV head h // (heads / HK)."""
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of `scores` over the last axis where `mask` allows, in at least float32.

    Returns (probs, lse); rows with no allowed entry get probs 0 and lse -inf, and no NaN
    reaches either the values or the gradients.
    """
    mask = mask.expand_as(scores)
    has_key = mask.any(dim=-1, keepdim=True)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * has_key
    return probs, lse.masked_fill(~has_key, float("-inf")).squeeze(-1)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over the keys `mask` allows, with grouped KV heads.

    q [B, T, HQ, DK], k [B, S, HK, DK], v [B, S, HK, DV], mask broadcastable to
    [B, HQ, T, S]. Returns o [B, T, HQ, DV] (0 on rows with no allowed key) and the
    log-sum-exp [B, T, HQ] in at least float32 (-inf on such rows).
    """
    heads = q.shape[2]
    k, v = repeat_heads(k, heads), repeat_heads(v, heads)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # [B, HQ, T, S]
    probs, lse = masked_softmax(scores, mask)  # [B, HQ, T, S], [B, HQ, T]
    out = torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v)  # [B, T, HQ, DV]
    return out, lse.transpose(1, 2).contiguous()
