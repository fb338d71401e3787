"""The megatron-core versions this package supports, and the optional accelerators it can use.

Everything version- or install-dependent is decided here, so the attention modules and specs
read the same on megatron-core 0.16 through 0.19.
"""

from __future__ import annotations

import importlib.util
import inspect

import megatron.core
import torch
from megatron.core import utils

SUPPORTED_MEGATRON_CORE = ((0, 16), (0, 20))
"""megatron-core versions this package is tested against: >= 0.16 and < 0.20."""


def megatron_core_version() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core."""
    major, minor = megatron.core.__version__.split(".")[:2]
    return int(major), int(minor)


def check_megatron_core_version() -> None:
    """Raise a clear error on a megatron-core outside the supported range.

    The attention modules rely on internals (layer offsets, sharded state dict helpers,
    TransformerLayer's calling convention) that change between minor releases.
    """
    low, high = SUPPORTED_MEGATRON_CORE
    version = megatron_core_version()
    if not low <= version < high:
        raise RuntimeError(
            f"megatron-nsa supports megatron-core >= {low[0]}.{low[1]}, < {high[0]}.{high[1]}; "
            f"found {megatron.core.__version__}. Install a supported version, e.g. "
            "`pip install 'megatron-core>=0.16,<0.20'`."
        )


def have_transformer_engine() -> bool:
    """True when transformer-engine's PyTorch extension can be imported."""
    return importlib.util.find_spec("transformer_engine") is not None


def get_batch_on_this_cp_rank(
    batch: dict[str, torch.Tensor], cp_group: torch.distributed.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """Megatron's load-balanced context-parallel split of [b, s] batch tensors.

    megatron-core 0.16 takes (batch, cp_group); 0.19 adds `is_hybrid_cp` before cp_group.
    """
    kwargs = {"cp_group": cp_group}
    if "is_hybrid_cp" in inspect.signature(utils.get_batch_on_this_cp_rank).parameters:
        kwargs["is_hybrid_cp"] = False
    return utils.get_batch_on_this_cp_rank(batch, **kwargs)


def _foreach_l2_norm(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
    per_tensor: bool, *args,
) -> tuple[torch.Tensor, None]:
    """amp_C.multi_tensor_l2norm's contract: the L2 norm of all tensors, fp32 [1], on the
    device."""
    norms = torch._foreach_norm(tensor_lists[0], 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(
    chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
    scale: float,
) -> None:
    """amp_C.multi_tensor_scale's contract: dst = src * scale, list by list."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_multi_tensor_ops() -> bool:
    """Give megatron-core's optimizer foreach versions of the multi-tensor ops that apex and
    Transformer Engine provide, when neither is installed; returns whether it did.

    Without them megatron-core falls back to per-tensor loops, and its gradient-norm
    fallback reads each parameter's norm back to the host: one device synchronisation per
    parameter, 40 ms of an H200 idling per step for the ~350M preset. The foreach versions
    compute the same values (the norm in fp32) without synchronising.
    """
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    if getattr(clip_grads, "l2_norm_impl", None) is not utils.local_multi_tensor_l2_norm:
        return False
    clip_grads.l2_norm_impl = _foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = _foreach_scale
    if getattr(mcore_optimizer, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
        mcore_optimizer.multi_tensor_scale_impl = _foreach_scale
    return True
