"""How the kernels cover a head dim: whole dims in two power-of-two parts, wide ones in
chunks and tiles."""

from __future__ import annotations

from nsa_kernels.tiles import head_split, split_key_dim


def test_split_key_dim():
    assert split_key_dim(96) == (64, 32)  # qk 64 + RoPE 32: not padded to 128
    assert split_key_dim(192) == (128, 64)  # MLA: no padding
    assert split_key_dim(576) == (512, 64)  # absorbed MLA latent + RoPE
    assert split_key_dim(40) == (32, 16)
    assert split_key_dim(24) == (16, 16)
    assert split_key_dim(128) == (128, 0)
    assert split_key_dim(8) == (16, 0)


def test_head_split_parts():
    whole = head_split(96, head_tile=256, head_chunk=64)
    assert (whole.block, whole.chunks, whole.tile, whole.tiles) == (128, 1, 128, 1)
    assert whole.parts == (64, 32)
    wide = head_split(576, head_tile=256, head_chunk=64)
    assert (wide.block, wide.chunks, wide.tile, wide.tiles) == (64, 9, 256, 3)
    assert wide.parts == (256, 0)  # chunked dims keep one accumulator tile
