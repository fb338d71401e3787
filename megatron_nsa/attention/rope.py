"""Rotary position embedding at explicit token positions.

The ASA layers apply RoPE themselves (GPTModel builds none when `multi_latent_attention` is
set), at positions they know: 0..s-1, restarting at every document of a packed sequence.
Frequencies come from Megatron's `RotaryEmbedding` / `YarnRotaryEmbedding`, so `rope_type`,
`rotary_base` and the YaRN fields mean what they mean in Megatron's MLA.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings import (
    RotaryEmbedding,
    YarnRotaryEmbedding,
    _yarn_get_mscale,
)
from megatron.core.transformer.transformer_config import TransformerConfig


def yarn_softmax_mscale(config: TransformerConfig) -> float:
    """The factor YaRN puts on attention logits (1 for plain RoPE), as Megatron's MLA."""
    if getattr(config, "rope_type", "rope") != "yarn":
        return 1.0
    return _yarn_get_mscale(config.rotary_scaling_factor, config.mscale_all_dim) ** 2


class Rotary(torch.nn.Module):
    """Rotates the first `dim` channels of the last axis (rotate-half convention)."""

    def __init__(
        self,
        config: TransformerConfig,
        dim: int,
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        rope_type = getattr(config, "rope_type", "rope")
        if rope_type == "rope":
            self.frequencies = RotaryEmbedding(
                dim,
                rotary_percent=1.0,
                rotary_base=config.rotary_base,
                use_cpu_initialization=config.use_cpu_initialization,
                cp_group=cp_group,
            )
        elif rope_type == "yarn":
            self.frequencies = YarnRotaryEmbedding(
                dim,
                rotary_base=config.rotary_base,
                use_cpu_initialization=config.use_cpu_initialization,
                scaling_factor=config.rotary_scaling_factor,
                original_max_position_embeddings=config.original_max_position_embeddings,
                beta_fast=config.beta_fast,
                beta_slow=config.beta_slow,
                mscale=config.mscale,
                mscale_all_dim=config.mscale_all_dim,
                cp_group=cp_group,
            )
        else:
            raise ValueError(f"rope_type={rope_type!r} is not supported; allowed: rope, yarn")

    def cos_sin(self, positions: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, ...]:
        """cos and sin [s, 1, 1, dim] (YaRN's magnitude scale folded in) at `positions` [s]."""
        emb = self.frequencies.get_emb(max_positions)
        scale = 1.0
        if isinstance(emb, tuple):  # YaRN returns (emb, mscale)
            emb, scale = emb
        emb = emb[positions.to(emb.device)]
        return emb.cos() * scale, emb.sin() * scale

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [s, b, h, d] with d >= dim: rotate x[..., :dim], keep the rest."""
        dim = cos.shape[-1]
        rot, rest = x[..., :dim], x[..., dim:]
        half = dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        rot = rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


def default_softmax_scale(config: TransformerConfig, head_dim: int) -> float:
    """config.softmax_scale if set, else 1 / sqrt(head_dim) times YaRN's logit factor."""
    if config.softmax_scale is not None:
        return config.softmax_scale
    return yarn_softmax_mscale(config) / math.sqrt(head_dim)
