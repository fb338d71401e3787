"""CPU stand-ins for the CUDA calls megatron-core makes, so that its models, DDP, optimizers
and dist_checkpointing run on CPU processes joined by gloo.

megatron-core assumes CUDA in a few places (RNG state, streams, `device="cuda"` buffers in
the optimizer and DDP, `param.type()` checks) and, in its MoE router, Transformer Engine.
`install_cpu_standins` replaces those calls with CPU equivalents. It patches torch
globally: call it once, early, in a process that has no GPU and will not use one. The
examples call it only when CUDA is unavailable; tests/megatron use it in their workers.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_FACTORIES = ("tensor", "zeros", "empty", "ones", "full", "arange", "zeros_like", "empty_like")


class _Stream:
    """Stand-in for torch.cuda.Stream: every operation is already synchronous on CPU."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args, **kwargs) -> None:
        return None


def _on_cpu(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    device = torch.device(device)
    return torch.device("cpu") if device.type == "cuda" else device


def install_cpu_standins() -> None:
    """Make megatron-core's CUDA calls run on CPU (call once per process)."""
    for name in _FACTORIES:
        original = getattr(torch, name)

        @functools.wraps(original)
        def factory(*args, _original=original, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _on_cpu(kwargs["device"])
            return _original(*args, **kwargs)

        setattr(torch, name, factory)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    tensor_type = torch.Tensor.type

    def type_(self, *args, **kwargs):
        # Megatron's optimizers accept only torch.cuda.*Tensor parameters.
        if args or kwargs or self.is_cuda:
            return tensor_type(self, *args, **kwargs)
        return tensor_type(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda *args, **kwargs: None
    cuda.Stream = _Stream
    cuda.current_stream = lambda *args, **kwargs: _Stream()
    cuda.default_stream = lambda *args, **kwargs: _Stream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.manual_seed = lambda *args, **kwargs: None
    cuda.manual_seed_all = lambda *args, **kwargs: None
    cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(1, dtype=torch.uint8)
    cuda.set_rng_state = lambda *args, **kwargs: None

    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda *args, **kwargs: torch.zeros(1, dtype=torch.uint8)
    random._set_cuda_rng_state = lambda *args, **kwargs: None

    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16's MoE router reads this name, defined only when TE imports.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
