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
