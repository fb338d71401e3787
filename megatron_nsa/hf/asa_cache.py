"""The latent KV cache of the ASA Hugging Face model (part of the exported code).

`ASACache` is what `generate` passes around as `cache` (`past_key_values` before
transformers 5.25): one `LayerCache` per layer holding latents for L and G layers (not
per-head keys and values), keys and values for D and N layers, per-row lengths, and `Tokens`,
which says where the tokens of one forward sit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .asa_ops import SelectionCarry, num_compressed_blocks, rope_cos_sin
from .configuration_asa import ASAConfig


@dataclass
class Tokens:
    """Where the tokens of one forward sit.

    In the first forward (prefill) each row's real tokens were moved to the front, so a
    token's position is its column. Later forwards (decode) continue each row at its own
    length; padding columns there (`valid` False) are neither cached nor attended to.
    """

    positions: torch.Tensor
    """[B, T] position of every column."""

    valid: torch.Tensor
    """[B, T] True for real tokens."""

    before: torch.Tensor
    """[B] real tokens of each row before this forward."""

    after: torch.Tensor
    """[B] real tokens of each row after it."""

    prefill: bool
    """True on the first forward (compacted rows, positions = columns)."""

    rope_base: float
    """RoPE frequency base (config.rotary_base)."""

    _rope: dict = field(default_factory=dict)

    def rope(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, dim] at these positions (computed once per dim)."""
        if dim not in self._rope:
            self._rope[dim] = rope_cos_sin(self.positions.clamp(min=0), dim, self.rope_base)
        return self._rope[dim]


def _grow(store: torch.Tensor | None, like: torch.Tensor, length: int) -> torch.Tensor:
    """A [B, >= length, ...] buffer holding `store`, doubled when it is too short."""
    if store is not None and store.shape[1] >= length:
        return store
    old = 0 if store is None else store.shape[1]
    grown = like.new_zeros(like.shape[0], max(length, 2 * old), *like.shape[2:])
    if store is not None:
        grown[:, :old] = store
    return grown


class LayerCache:
    """Decoding state of one layer.

    `tokens` holds per-position tensors [B, capacity, ...] (position p of row b at [b, p]);
    local layers keep them in a ring of w slots instead (slot p % w, with `ring_positions`
    saying which position a slot holds). `compressed` holds compressed tokens by block
    index. `carry` is the score of an unfinished selection query block.
    """

    def __init__(self, ring: int | None = None) -> None:
        self.ring = ring
        self.tokens: dict[str, torch.Tensor] = {}
        self.compressed: dict[str, torch.Tensor] = {}
        self.ring_positions: torch.Tensor | None = None
        self.carry: SelectionCarry | None = None

    def write(self, values: dict[str, torch.Tensor], tokens: Tokens) -> None:
        """Store the real tokens of values [B, T, ...] at their positions."""
        positions, valid = tokens.positions, tokens.valid
        if self.ring is not None:
            last = torch.where(valid, positions, -1).amax(1, keepdim=True)
            valid = valid & (positions > last - self.ring)  # older ones would be overwritten
            if self.ring_positions is None:
                self.ring_positions = positions.new_full((positions.shape[0], self.ring), -1)
            slots = positions % self.ring
        else:
            slots = positions
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(slots)
        rows, slots = rows[valid], slots[valid]
        length = self.ring or int(tokens.after.max())
        for name, value in values.items():
            store = _grow(self.tokens.get(name), value, length)
            store[rows, slots] = value[valid].to(store.dtype)
            self.tokens[name] = store
        if self.ring is not None:
            self.ring_positions[rows, slots] = positions[valid]

    def compress(
        self,
        name: str,
        span: Callable[[int, int], torch.Tensor],
        compressor: Callable[[torch.Tensor], torch.Tensor],
        block: int,
        stride: int,
        tokens: Tokens,
    ) -> None:
        """Append the compressed tokens of the blocks [i*s, i*s + l) this forward completed.

        span(start, end): the cached tokens [B, end - start, heads, D] that `name` compresses;
        compressor: [B, t, heads, D] -> [B, blocks, heads, D]."""
        old = num_compressed_blocks(tokens.before, block, stride)
        new = num_compressed_blocks(tokens.after, block, stride)
        lo, hi = int(old.min()), int(new.max())
        if hi <= lo:
            return
        fresh = compressor(span(lo * stride, (hi - 1) * stride + block))  # [B, hi - lo, H, D]
        index = torch.arange(lo, hi, device=fresh.device)[None, :]
        keep = (index >= old[:, None]) & (index < new[:, None])  # [B, hi - lo]
        store = _grow(self.compressed.get(name), fresh, hi)
        rows = torch.arange(fresh.shape[0], device=fresh.device)[:, None].expand_as(keep)
        store[rows[keep], index.expand_as(keep)[keep]] = fresh[keep].to(store.dtype)
        self.compressed[name] = store

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (beam search)."""
        for store in (self.tokens, self.compressed):
            for name, value in store.items():
                store[name] = value.index_select(0, index.to(value.device))
        if self.ring_positions is not None:
            self.ring_positions = self.ring_positions.index_select(0, index)
        if self.carry is not None:
            self.carry = SelectionCarry(
                self.carry.group.index_select(0, index), self.carry.score.index_select(0, index)
            )


class ASACache:
    """Latent KV cache of an ASA model for `generate` (passed as `cache`, or `past_key_values`).

    `lengths` [B]: real tokens cached per row; `columns`: input columns seen (padding
    included), which is what transformers calls the sequence length of a cache.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: ASAConfig) -> None:
        window = config.sliding_window_size
        self.layers = [
            LayerCache(window if config.layer_kind(i) == "L" else None)
            for i in range(config.num_hidden_layers)
        ]
        self.lengths: torch.Tensor | None = None
        self.columns = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns seen so far: generate slices new input ids after them."""
        return self.columns

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, beam_idx.to(self.lengths.device))

    def memory_bytes(self) -> int:
        """Bytes of the cached values (latents, keys, values, compressed tokens; buffers grow
        by doubling, so they may hold room for more tokens than were seen)."""
        total = 0
        for layer in self.layers:
            for store in (layer.tokens, layer.compressed):
                total += sum(t.numel() * t.element_size() for t in store.values())
        return total
