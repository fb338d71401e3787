"""Pieces shared by the benchmark scripts: timing, the SDPA full-attention baseline, and
forward / forward+backward callables. Scripts run as `python3 benchmarks/<name>.py`, so
this module is importable as `common`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def sdpa_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor], str]:
    """Full causal SDPA on its own [B, H, T, D] leaf copies, preferring the flash backend.

    Tries flash with V zero-padded to DK and native GQA, then flash with KV heads expanded,
    then whatever backend torch picks for the unpadded dims. Returns (forward, leaves, label).
    """
    heads, qk_dim, v_dim = q.shape[2], q.shape[-1], v.shape[-1]
    gqa = heads != k.shape[2]
    attempts = [
        (True, False, "SDPA flash"),
        (True, True, "SDPA flash, KV heads expanded"),
        (False, False, "SDPA (torch's choice)"),
    ]
    for flash, expand, label in attempts:
        k_, v_ = (x.repeat_interleave(heads // x.shape[2], 2) if expand else x for x in (k, v))
        if flash and v_dim != qk_dim:
            v_ = F.pad(v_, (0, qk_dim - v_dim))
            label += f", V padded to {qk_dim}"
        leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k_, v_)]

        def forward(leaves=leaves, flash=flash, expand=expand) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else nullcontext():
                return F.scaled_dot_product_attention(
                    *leaves, is_causal=True, enable_gqa=gqa and not expand
                )

        try:
            forward()
        except RuntimeError:
            continue
        return forward, leaves, label
    raise RuntimeError("no SDPA backend accepted these shapes")


def fwd_and_fwd_bwd(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]):
    """Callables for one forward and one forward + backward with a fixed output gradient."""
    do = torch.randn_like(forward())

    def forward_backward() -> None:
        torch.autograd.grad(forward(), inputs, do)

    return forward, forward_backward
