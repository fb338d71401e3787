"""megatron_nsa: Alternating Sparse Attention layers for NVIDIA Megatron-Core."""

from .config import ASATransformerConfig

__all__ = ["ASATransformerConfig"]
