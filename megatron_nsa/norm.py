"""Normalization layers that work with sequence parallelism.

Megatron's `WrappedTorchNorm` (its fallback without apex or Transformer Engine) refuses
sequence parallelism. `Norm` accepts it: under sequence parallelism its parameters see only
this rank's tokens, so they carry Megatron's `sequence_parallel` attribute and
`finalize_model_grads` sums their gradients over the TP group. It uses apex's fused RMSNorm
and LayerNorm kernels on CUDA tensors when apex is importable; without apex, and with
`config.fuse_elementwise`, the norm with its casts to and from fp32 runs compiled: one kernel
each way instead of a cast, the norm, a cast back and the backward's three (for the ~350M
preset at 64k tokens the norm kernels alone took 54 ms of a ~920 ms step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from .fusible import Fusible
from .parallel import param_device

try:
    from apex.normalization.fused_layer_norm import (
        fused_layer_norm_affine,
        fused_rms_norm_affine,
    )

    HAVE_APEX_NORM = True
except ImportError:
    HAVE_APEX_NORM = False

NORMALIZATIONS = ("RMSNorm", "LayerNorm")


@Fusible
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, in fp32, returned in x's dtype; weight
    broadcasts over x's trailing dims ([d], or [heads, d] for per-head norms)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


@Fusible
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim, in fp32, returned in x's dtype."""
    shape = (x.shape[-1],)
    return F.layer_norm(x.float(), shape, weight.float(), bias.float(), eps).to(x.dtype)


class Norm(torch.nn.Module):
    """RMSNorm or LayerNorm over the last axis, as `config.normalization` says.

    Built like Megatron's norms: `Norm(config=..., hidden_size=..., eps=...)`.
    """

    supports_sequence_parallel = True
    """Read by the specs: parameters are marked for the TP gradient sum under SP."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        normalization: str | None = None,
    ) -> None:
        super().__init__()
        self.normalization = normalization or config.normalization
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization={self.normalization!r} is not supported by megatron_nsa.Norm; "
                f"allowed: {', '.join(NORMALIZATIONS)}"
            )
        if config.layernorm_zero_centered_gamma:
            raise ValueError("megatron_nsa.Norm does not implement layernorm_zero_centered_gamma")
        self.hidden_size, self.eps = hidden_size, eps
        self.fuse = getattr(config, "fuse_elementwise", False)
        device, dtype = param_device(config), config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = None
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.hidden_size,)
        if HAVE_APEX_NORM and x.is_cuda:
            if self.bias is None:
                return fused_rms_norm_affine(x, self.weight, shape, self.eps)
            return fused_layer_norm_affine(x, self.weight, self.bias, shape, self.eps)
        if self.bias is None:
            return rms_norm(x, self.weight, self.eps, fuse=self.fuse)
        return layer_norm(x, self.weight, self.bias, self.eps, fuse=self.fuse)


def supports_sequence_parallel(norm: object) -> bool:
    """Whether a norm class (or spec) marks its parameters for sequence parallelism.

    Transformer Engine's and apex's norms do; Megatron's torch fallback `WrappedTorchNorm`
    and plain torch norms do not. Other classes opt in with a class attribute
    `supports_sequence_parallel = True`.
    """
    module = getattr(norm, "module", norm)
    if getattr(module, "supports_sequence_parallel", False):
        return True
    return getattr(module, "__name__", "") in {"TENorm", "FusedLayerNorm", "IdentityOp"}
