"""Functions that run compiled by `torch.compile` on CUDA tensors and as written elsewhere.

Chains of small elementwise ops over activations (RoPE, concatenations, norms in fp32 with
their casts) read and write the whole tensor once per op; compiled they run as one kernel
per direction, as Megatron's `jit_fuser` does for bias + GeLU. The norms (`megatron_nsa.norm`)
and the attention layers' glue (`megatron_nsa.attention.fusion`) are built on this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


class Fusible:
    """A function of tensors that runs compiled when asked to fuse and its first argument is
    on CUDA. Compiled once, lazily; shapes that change are then traced dynamically."""

    def __init__(self, fn: Callable[..., Outputs]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Outputs] | None = None
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __call__(self, *args: torch.Tensor | float | None, fuse: bool = False) -> Outputs:
        if not (fuse and args[0].is_cuda):
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, fullgraph=True)
        return self.compiled(*args)
