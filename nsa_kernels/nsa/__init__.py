"""The gated composition of the global layer (and of classic three-branch NSA).

o = g_cmp * o_cmp + g_slc * o_slc [+ g_win * o_win]: compressed attention, block
selection from its probabilities, attention over the selected blocks, and optionally a
sliding window (NSA's third branch, used by the "N" baseline; ASA's global layer has none).
"""

from __future__ import annotations

import torch

from ..compressed_attention import compressed_attention
from ..selected_attention import selected_attention
from ..selection import select_blocks
from ..window import sliding_window_attention


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    gate_cmp: torch.Tensor,
    gate_slc: torch.Tensor,
    *,
    block_size: int,
    stride: int,
    select_block_size: int,
    top_n: int,
    num_selection_heads: int | None = None,
    selection_query_block: int = 1,
    window_size: int | None = None,
    gate_window: torch.Tensor | None = None,
    k_window: torch.Tensor | None = None,
    v_window: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int = 0,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """q [B, T, HQ, DK]; k, v [B, o + T, HK, DK|DV] (selection keys); k_cmp, v_cmp
    [B, N, HK, DK|DV] (compressed keys of the o + T tokens); gates [B, T, HQ] (already
    through the sigmoid). The window branch runs when `window_size` is given, on
    k_window/v_window (default k, v) -> o [B, T, HQ, DV]. With `q_offset` o the queries are
    the last T of the keys (query i at position o + i): one context-parallel chunk.
    `deterministic`: no fp32 atomics in the selected branch (bitwise repeatable)."""
    gates = {"gate_cmp": gate_cmp, "gate_slc": gate_slc, "gate_window": gate_window}
    for name, gate in gates.items():
        if gate is not None and gate.shape != q.shape[:3]:
            raise ValueError(
                f"{name} must be [B, T, HQ] = {tuple(q.shape[:3])}, got {tuple(gate.shape)}"
            )
    if (window_size is None) != (gate_window is None):
        raise ValueError("window_size and gate_window must be given together (or neither)")
    common = {"scale": scale, "cu_seqlens": cu_seqlens, "q_offset": q_offset, "backend": backend}
    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, block_size, stride, **common)
    indices = select_blocks(
        q, k_cmp, block_size, stride, select_block_size, top_n,
        num_selection_heads=num_selection_heads, selection_query_block=selection_query_block,
        lse=lse_cmp.detach(), **common,
    )
    o_slc = selected_attention(
        q, k, v, indices, select_block_size, selection_query_block=selection_query_block,
        deterministic=deterministic, **common,
    )
    out = gate_cmp.unsqueeze(-1) * o_cmp + gate_slc.unsqueeze(-1) * o_slc
    if window_size is not None:
        o_win = sliding_window_attention(
            q, k if k_window is None else k_window, v if v_window is None else v_window,
            window_size, **common,
        )
        out = out + gate_window.unsqueeze(-1) * o_win
    return out
