"""How much a generating model caches: ASA's latent cache against NSA and full attention.

Values cached per layer after T tokens, as `ASACache` stores them (w: window, s: stride,
N(T) = compression blocks complete among T tokens, about T / s):

- L (MLA, sliding window): min(T, w) * (d_c + d_R): the latent and RoPE key of the last w.
- G (GLA, compression + selection): T * (h_c d_c' + d_R) for every token's latents, plus
  N(T) * h_c * (d_c' + d_R) compressed latent tokens.
- D (full attention, GQA): T * 2 G d, keys and values of G KV heads.
- N (NSA, GQA; the NSA paper's layout): T * 2 G d for selection (the window reads the same
  keys and values) plus N(T) * 2 G d compressed keys and values.

The baselines of an ASA config are the same model with every layer N ("NSA with GQA") or
every layer D ("full attention with GQA"): same heads, KV heads G and head dim d.
`python -m megatron_nsa.hf.kv_cache` prints the table of docs/hf_export.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from .asa_ops import num_compressed_blocks
from .configuration_asa import ASAConfig

LENGTHS = (8192, 65536, 131072)

PRESET_350M = ASAConfig(
    vocab_size=32768,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=4,
    kv_lora_rank=512,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    attention_pattern="LG",
    sliding_window_size=512,
    compress_block_size=32,
    compress_stride=16,
    select_block_size=64,
    select_top_n=16,
    selection_query_block=4,
    global_num_latent_heads=2,
    global_kv_lora_rank=256,
)
"""The ~350M model of examples/pretrain_asa.py (`--preset 350m`)."""


def layer_cache_values(config: ASAConfig, kind: str, tokens: int) -> int:
    """Values one layer of `kind` caches after `tokens` tokens (one sequence)."""
    blocks = num_compressed_blocks(tokens, config.compress_block_size, config.compress_stride)
    d_rope = config.qk_rope_head_dim
    if kind == "L":
        return min(tokens, config.sliding_window_size) * (config.kv_lora_rank + d_rope)
    if kind == "G":
        latents, d_latent = config.global_num_latent_heads, config.global_kv_lora_rank
        return tokens * (latents * d_latent + d_rope) + blocks * latents * (d_latent + d_rope)
    kv = 2 * config.num_key_value_heads * config.head_dim
    return tokens * kv + (blocks * kv if kind == "N" else 0)


def cache_bytes(config: ASAConfig, tokens: int, pattern: str | None = None, value_bytes=2):
    """Bytes cached after `tokens` tokens by the model, with its own layer kinds or, given
    `pattern`, with `pattern` repeated over its layers (e.g. "N" for its NSA baseline)."""
    pattern = pattern or config.attention_pattern
    kinds = [pattern[i % len(pattern)] for i in range(config.num_hidden_layers)]
    return value_bytes * sum(layer_cache_values(config, kind, tokens) for kind in kinds)


@dataclass(frozen=True)
class CacheRow:
    """One layout's cache at each length: total bytes and bytes per token."""

    layout: str
    totals: tuple[int, ...]
    lengths: tuple[int, ...] = LENGTHS

    def per_token(self) -> tuple[float, ...]:
        return tuple(total / n for total, n in zip(self.totals, self.lengths, strict=True))


def compare(config: ASAConfig, lengths: tuple[int, ...] = LENGTHS, value_bytes: int = 2):
    """[ASA, NSA with GQA, full attention with GQA] rows for `config` (bf16 by default)."""
    layouts = {
        f"ASA ({config.attention_pattern})": None,
        "NSA, GQA": "N",
        "full attention, GQA": "D",
    }
    return [
        CacheRow(
            name, tuple(cache_bytes(config, n, pattern, value_bytes) for n in lengths), lengths
        )
        for name, pattern in layouts.items()
    ]


def markdown_table(config: ASAConfig, lengths: tuple[int, ...] = LENGTHS) -> str:
    """The cache table of docs/hf_export.md: KiB per token and MiB per sequence, and each
    layout's size relative to NSA."""
    rows = compare(config, lengths)
    nsa = rows[1]
    head = [f"{n // 1024}k" for n in lengths]
    columns = [f"KiB/token @ {h}" for h in head] + [f"MiB @ {h}" for h in head]
    columns += [f"vs NSA @ {h}" for h in head]
    lines = ["| layout | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [f"{b / 1024:.2f}" for b in row.per_token()]
        cells += [f"{b / 2**20:.0f}" for b in row.totals]
        cells += [f"{b / n:.0%}" for b, n in zip(row.totals, nsa.totals, strict=True)]
        lines.append(f"| {row.layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table(PRESET_350M))
