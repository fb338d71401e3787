"""The elementwise glue of the attention layers, fused on the GPU.

RoPE on a head's last d_R channels, the concatenation of RoPE and non-RoPE halves and the
gated sum of the global layer's branches are chains of small elementwise ops over
[s, b, heads, dim] tensors, each op reading and writing the whole tensor (at 64k tokens they
took ~10% of a training step). With `config.fuse_elementwise` and CUDA tensors each function
below runs compiled (`megatron_nsa.fusible.Fusible`); otherwise, and on CPU, as written. The
norms, the latent heads' included, are in `megatron_nsa.norm`.
"""

from __future__ import annotations

import torch

from ..fusible import Fusible
from .rope import Rotary


@Fusible
def rope_cat(
    nope: torch.Tensor, rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """[nope ; RoPE(rope)]: nope [s, b, H, d], rope [s, b, H or 1, d_R] (one shared key part
    is broadcast over the heads), cos, sin [s, 1, 1, d_R] -> [s, b, H, d + d_R]."""
    rotated = Rotary.rotate(rope, cos, sin)
    return torch.cat((nope, rotated.expand(*nope.shape[:-1], -1)), dim=-1)


@Fusible
def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[x_nope ; RoPE(x_rope)] of x = [x_nope ; x_rope] [s, b, H, d + d_R], d_R = cos's last
    dim (the query). Split inside, so that fused the backward writes x's gradient in one
    kernel instead of concatenating the two halves' gradients."""
    d_r = cos.shape[-1]
    nope, rope = x.split([x.shape[-1] - d_r, d_r], dim=-1)
    return rope_cat.fn(nope, rope, cos, sin)


@Fusible
def rope_kv(
    kv: torch.Tensor, rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of an MLA up-projection: kv [s, b, H, d + d_v] (each head's d key then
    d_v value channels), rope [s, b, 1, d_R], cos, sin [s, 1, 1, d_R] -> keys [nope ;
    RoPE(rope)] [s, b, H, d + d_R] and values [s, b, H, d_v]. Split inside, so that fused the
    backward writes kv's gradient in one kernel instead of concatenating the two parts'."""
    nope, value = kv.split([key_dim, kv.shape[-1] - key_dim], dim=-1)
    return rope_cat.fn(nope, rope, cos, sin), value.contiguous()


@Fusible
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first d_R channels of x [s, b, H, d] (`Rotary.rotate`)."""
    return Rotary.rotate(x, cos, sin)


@Fusible
def group_cat(nope: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """Per-head keys from a group's shared part: nope [b, n, H, d], shared [b, n, h_c, d_R]
    with query head h reading group h // (H / h_c) -> [b, n, H, d + d_R]."""
    groups = shared.shape[2]
    nope = nope.unflatten(2, (groups, -1))  # [b, n, h_c, H / h_c, d]
    shared = shared.unsqueeze(3).expand(*nope.shape[:-1], -1)
    return torch.cat((nope, shared), dim=-1).flatten(2, 3)


@Fusible
def group_kv(
    kv: torch.Tensor, shared: torch.Tensor, key_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a GLA up-projection: kv [b, n, h_c, H / h_c, d + d_v] (each head's d
    key then d_v value channels, any strides), shared [b, n, h_c, d_R] -> keys [nope ; the
    group's shared part] [b, n, H, d + d_R] and values [b, n, H, d_v]. One kernel each way,
    as `rope_kv`."""
    nope, value = kv.split([key_dim, kv.shape[-1] - key_dim], dim=-1)
    return group_cat.fn(nope.flatten(2, 3), shared), value.flatten(2, 3).contiguous()


@Fusible
def gated_sum(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor) -> torch.Tensor:
    """g_cmp o_cmp + g_slc o_slc: gates [b, t, H, 2], outputs [b, t, H, d_v]."""
    return gates[..., :1] * o_cmp + gates[..., 1:] * o_slc
