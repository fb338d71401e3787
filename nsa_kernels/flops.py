"""Query-key pairs and FLOPs each attention pattern really computes, for benchmarks and
throughput logs (sparse FLOPs vs the dense-equivalent a full-attention model would need).

Counts are exact for one causal sequence of `seqlen` tokens; the selection count assumes
every query has its n blocks (the usual case once n blocks exist).
"""

from __future__ import annotations

import torch


def causal_pairs(seqlen: int) -> int:
    return seqlen * (seqlen + 1) // 2


def window_pairs(seqlen: int, window_size: int) -> int:
    t = torch.arange(seqlen, dtype=torch.int64)
    return int(torch.clamp(t + 1, max=window_size).sum())


def compressed_pairs(seqlen: int, block_size: int, stride: int) -> int:
    t = torch.arange(seqlen, dtype=torch.int64)
    visible = torch.div(t - block_size + 1, stride, rounding_mode="floor") + 1
    return int(visible.clamp(min=0).sum())


def selected_pairs(seqlen: int, select_block_size: int, top_n: int) -> int:
    t = torch.arange(seqlen, dtype=torch.int64)
    current = t // select_block_size
    full_blocks = torch.clamp(current + 1, max=top_n) - 1
    return int((full_blocks * select_block_size + t - current * select_block_size + 1).sum())


def attention_flops(pairs: int, heads: int, qk_dim: int, v_dim: int, backward: bool = False) -> int:
    """2 FLOPs per multiply-add for q.k and p.v; the backward costs 2.5x the forward."""
    forward = 2 * pairs * heads * (qk_dim + v_dim)
    return forward * 7 // 2 if backward else forward
