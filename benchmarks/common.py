"""Pieces shared by the benchmark scripts: timing, the SDPA full-attention baseline,
forward / forward+backward callables, and the roofline of an op (its compulsory memory
traffic against the GPU's peaks). Scripts run as `python3 benchmarks/<name>.py`, so this
module is importable as `common`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
"""(dense bf16 tensor-core FLOP/s, HBM bytes/s) of the SXM parts, from NVIDIA's data sheets."""


def timed(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def compulsory_bytes(
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    backward: bool,
    index: Sequence[torch.Tensor] = (),
) -> int:
    """Bytes an op cannot avoid moving: the forward reads its inputs (and any block index)
    and writes its outputs once; the backward reads the inputs, the outputs and dO = outputs[0]
    again and writes one gradient per input."""
    forward = nbytes(*inputs, *outputs, *index)
    if not backward:
        return forward
    return forward + 2 * nbytes(*inputs) + nbytes(*outputs, outputs[0], *index)


def roofline(flops: float, traffic: int, ms: float) -> tuple[float, float]:
    """(TB/s of the compulsory traffic, % of the roofline time reached), where the roofline
    time is the longer of FLOPs at peak FLOP/s and traffic at peak bandwidth; the % is nan
    on a GPU missing from PEAKS."""
    tbps = traffic / ms / 1e9
    name = torch.cuda.get_device_name()
    peaks = next((p for key, p in PEAKS.items() if key in name), None)
    if peaks is None:
        return tbps, float("nan")
    bound_ms = max(flops / peaks[0], traffic / peaks[1]) * 1e3
    return tbps, 100 * bound_ms / ms


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
