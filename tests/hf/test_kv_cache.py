"""KV-cache accounting: the formulas of megatron_nsa.hf.kv_cache are what ASACache stores,
and the table in docs/hf_export.md is what they give for the 350M preset."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_nsa.hf.configuration_asa import ASAConfig
from megatron_nsa.hf.kv_cache import (
    PRESET_350M,
    cache_bytes,
    compare,
    layer_cache_values,
    markdown_table,
)
from megatron_nsa.hf.modeling_asa import ASAForCausalLM

DOCS = Path(__file__).resolve().parents[2] / "docs" / "hf_export.md"
TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, attention_pattern="LGDN",
    sliding_window_size=16, compress_block_size=8, compress_stride=4, select_block_size=16,
    select_top_n=4, global_num_latent_heads=2, global_kv_lora_rank=8,
)


@torch.no_grad()
def test_accounting_is_what_the_cache_holds():
    config = ASAConfig(**TINY)
    model = ASAForCausalLM(config).eval()
    length, batch = 50, 3  # > w, 11 compression blocks and a pending one
    cache = model(torch.randint(0, 64, (batch, length))).past_key_values
    expected = sum(
        layer_cache_values(config, config.layer_kind(i), length) for i in range(4)
    )
    assert cache.memory_bytes() == batch * 4 * expected  # float32; a prefill sizes exactly
    assert cache_bytes(config, length, value_bytes=4) == 4 * expected


def test_preset_figures():
    kv = 24 * 2 * 4 * 64 * 2  # 24 layers, K and V of 4 heads of 64, bf16: bytes per token
    rows = {row.layout: row for row in compare(PRESET_350M)}
    assert rows["full attention, GQA"].per_token() == (kv,) * 3
    blocks = (131072 - 32) // 16 + 1  # NSA also caches the compressed K and V
    assert rows["NSA, GQA"].totals[-1] == kv * (131072 + blocks)
    ratio = rows["ASA (LG)"].totals[-1] / rows["NSA, GQA"].totals[-1]
    assert 0.5 < ratio < 0.55


def test_docs_table_is_current():
    assert markdown_table(PRESET_350M) in DOCS.read_text()
