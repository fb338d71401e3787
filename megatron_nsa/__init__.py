"""megatron_nsa: Alternating Sparse Attention layers for NVIDIA Megatron-Core."""

from .config import ASATransformerConfig
from .specs import asa_layer_spec, get_asa_decoder_block_spec, get_asa_layer_spec

__all__ = [
    "ASATransformerConfig",
    "asa_layer_spec",
    "get_asa_decoder_block_spec",
    "get_asa_layer_spec",
]
