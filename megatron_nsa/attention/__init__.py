"""ASA attention modules for Megatron-Core, one small module per layer kind.

- local.py: "L", MLA over a sliding window.
- global_latent.py: "G", GLA with compression + selection.
- dense.py: "D", full causal GQA attention (baseline).
- nsa.py: "N", classic three-branch NSA over GQA K/V (baseline).
"""

from .compressor import MeanCompressor, MLPCompressor
from .dense import DenseCoreAttention, DenseSelfAttention, DenseSelfAttentionSubmodules
from .global_latent import (
    GlobalCoreAttention,
    GlobalCoreAttentionSubmodules,
    GlobalSelfAttention,
    GlobalSelfAttentionSubmodules,
    LatentNorm,
)
from .linear import DuplicatedLinear, LatentDownProjection, LatentKVUpProjection, TEDuplicatedLinear
from .local import LocalSelfAttention, LocalSelfAttentionSubmodules, SlidingWindowCoreAttention
from .nsa import (
    NSACoreAttention,
    NSACoreAttentionSubmodules,
    NSASelfAttention,
    NSASelfAttentionSubmodules,
)

__all__ = [
    "DenseCoreAttention",
    "DenseSelfAttention",
    "DenseSelfAttentionSubmodules",
    "DuplicatedLinear",
    "GlobalCoreAttention",
    "GlobalCoreAttentionSubmodules",
    "GlobalSelfAttention",
    "GlobalSelfAttentionSubmodules",
    "LatentDownProjection",
    "LatentKVUpProjection",
    "LatentNorm",
    "LocalSelfAttention",
    "LocalSelfAttentionSubmodules",
    "MLPCompressor",
    "MeanCompressor",
    "NSACoreAttention",
    "NSACoreAttentionSubmodules",
    "NSASelfAttention",
    "NSASelfAttentionSubmodules",
    "SlidingWindowCoreAttention",
    "TEDuplicatedLinear",
]
