"""Generation with the latent cache: decoding token by token (or in chunks) gives the logits
of one full forward, for prompts shorter and longer than the window and across compression
blocks; left padding changes nothing for real tokens; generate() runs greedy, sampled and
beam search, batched with left padding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_nsa.hf.configuration_asa import ASAConfig
from megatron_nsa.hf.modeling_asa import ASAForCausalLM

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, attention_pattern="LGDN",
    sliding_window_size=16, compress_block_size=8, compress_stride=4, select_block_size=16,
    select_top_n=4, global_num_latent_heads=2, global_kv_lora_rank=8, initializer_range=0.1,
)
VARIANTS = {
    "plain": {},
    "low_rank_query_mean_compressor_layernorm": dict(
        q_lora_rank=12, compressor="mean", normalization="LayerNorm"
    ),
    "swiglu_biases_learned_positions_tied": dict(
        gated_mlp=True, hidden_act="silu", mlp_bias=True, attention_out_bias=True,
        position_embedding_type="learned_absolute", max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    "one_latent_head_partial_rope": dict(global_num_latent_heads=1, rotary_percent=0.5),
    "four_queries_per_selection": dict(selection_query_block=4, select_top_n=3),
}


def tiny_model(seed: int = 0, **overrides) -> ASAForCausalLM:
    torch.manual_seed(seed)
    return ASAForCausalLM(ASAConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def exported_models(exported) -> dict[str, torch.nn.Module]:
    return {
        case: AutoModelForCausalLM.from_pretrained(exported[case], trust_remote_code=True).eval()
        for case in ("tp2", "pp2", "dn")
    }


def decode(model, ids: torch.Tensor, prompt: int, attention_mask=None) -> torch.Tensor:
    """Logits of `ids` from a prefill of `prompt` tokens, then one token per forward."""
    mask = attention_mask
    out = model(ids[:, :prompt], attention_mask=None if mask is None else mask[:, :prompt])
    logits, cache = [out.logits], out.past_key_values
    for t in range(prompt, ids.shape[1]):
        step_mask = None if mask is None else mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=step_mask, past_key_values=cache)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


@torch.no_grad()
@pytest.mark.parametrize("case", ["tp2", "pp2", "dn"])
@pytest.mark.parametrize("prompt", [1, 7, 40])  # < l (8), < w (16), > w and blocks
def test_cached_decoding_equals_full_forward(exported_models, tokens, case, prompt):
    model = exported_models[case]
    full = model(tokens, use_cache=False).logits
    assert_same_logits(decode(model, tokens, prompt), full)


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_of_every_option(variant):
    model = tiny_model(**VARIANTS[variant])
    ids = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(1))
    full = model(ids, use_cache=False).logits
    assert_same_logits(decode(model, ids, 21), full)
    chunks, cache = [], None  # several tokens per forward on a filled cache
    for start, end in ((0, 5), (5, 30), (30, 31), (31, 70)):
        out = model(ids[:, start:end], past_key_values=cache)
        chunks.append(out.logits)
        cache = out.past_key_values
    assert_same_logits(torch.cat(chunks, dim=1), full)


@torch.no_grad()
def test_cache_under_either_name(exported_models, tokens):
    """generate passes the cache as `cache` from transformers 5.25 on and as
    `past_key_values` before: both names feed the same cache, giving both at once is refused."""
    model = exported_models["tp2"]
    full = model(tokens, use_cache=False).logits
    for name in ("cache", "past_key_values"):
        first = model(tokens[:, :20])
        cache = first.past_key_values
        rest = model(tokens[:, 20:], **{name: cache})
        assert rest.past_key_values is cache
        assert_same_logits(torch.cat([first.logits, rest.logits], dim=1), full)
    with pytest.raises(ValueError, match="not both"):
        model(tokens[:, 20:], cache=cache, past_key_values=cache)


@torch.no_grad()
def test_cache_keeps_latents(exported_models, tokens):
    """L: a ring of w latent tokens; G: every latent token and the compressed ones (the
    pending tokens of the unfinished block are the newest latents); D/N: keys and values."""
    length = 45  # 10 complete compression blocks (l=8, s=4) and a pending one
    cache = exported_models["tp2"](tokens[:, :length]).past_key_values
    local, global_ = cache.layers[0], cache.layers[1]
    assert {k: tuple(v.shape) for k, v in local.tokens.items()} == {
        "latent": (2, 16, 32), "k_rope": (2, 16, 8)
    }
    assert sorted(local.ring_positions[0].tolist()) == list(range(length - 16, length))
    assert global_.tokens["latent"].shape[1:] == (length, 2, 16)
    assert global_.tokens["k_rope"].shape[1:] == (length, 8)
    assert global_.compressed["latent"].shape[1:] == (10, 2, 24)
    cache = exported_models["dn"](tokens[:, :length]).past_key_values
    assert set(cache.layers[0].tokens) == {"k", "v"} and not cache.layers[0].compressed
    assert set(cache.layers[1].compressed) == {"k", "v"}


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


@torch.no_grad()
def test_left_padding_does_not_touch_real_tokens(exported_models, tokens):
    model = exported_models["pp2"]
    rows = [tokens[0, :70], tokens[1, :23], tokens[0, 5:9]]
    ids, mask = left_padded(rows)
    batched = model(ids, attention_mask=mask, use_cache=False).logits
    decoded = decode(model, ids, ids.shape[1] - 10, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = model(row[None], use_cache=False).logits[0]
        assert_same_logits(batched[i, -len(row) :], alone)
        assert_same_logits(decoded[i, -len(row) :], alone)


@torch.no_grad()
def test_generate_greedy_batched_with_left_padding(exported_models, tokens):
    model = exported_models["tp2"]
    rows = [tokens[0, :30], tokens[1, :9]]
    ids, mask = left_padded(rows)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=20, do_sample=False)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(row) :])
    full = model(batched[1:, ids.shape[1] - len(rows[1]) :], use_cache=False).logits
    assert torch.equal(full[0, len(rows[1]) - 1 : -1].argmax(-1), batched[1, ids.shape[1] :])


@torch.no_grad()
def test_generate_sampled_and_beam_search(exported_models, tokens):
    model = exported_models["dn"]
    ids, mask = left_padded([tokens[0, :20], tokens[1, :11]])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20,
            num_return_sequences=2,
        ))
    assert runs[0].shape == (4, ids.shape[1] + 12) and torch.equal(runs[0], runs[1])
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3)
    assert beams.shape == (2, ids.shape[1] + 8)


@torch.no_grad()
def test_kernel_backend_matches_inline():
    """attention_backend="nsa_kernels" packs the rows for nsa_kernels' ops (their reference
    backend on CPU): same logits as the inline code, padding included."""
    model = tiny_model()
    ids, mask = left_padded([torch.arange(60) % 64, torch.arange(5, 42) % 64])
    inline = model(ids, attention_mask=mask, use_cache=False).logits
    model.config.attention_backend = "nsa_kernels"
    packed = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(packed[mask.bool()], inline[mask.bool()], atol=1e-5, rtol=0)


def test_position_ids_are_refused():
    """Positions follow the attention mask; silently ignoring position_ids would mislead."""
    with pytest.raises(ValueError, match="position_ids are not accepted"):
        tiny_model()(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.arange(3)[None])
