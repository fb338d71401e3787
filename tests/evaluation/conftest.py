"""Shared fixtures: a small BPE over stdlib code as a Hugging Face tokenizer, held-out texts
(the tomllib package), a random-init tiny ASA model, and an oracle that copies."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

from megatron_nsa.data import StdlibCorpus, save_tokenizer, train_tokenizer
from megatron_nsa.hf.configuration_asa import ASAConfig
from megatron_nsa.hf.modeling_asa import ASAForCausalLM

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=8, attention_pattern="LG", sliding_window_size=32,
    compress_block_size=8, compress_stride=4, select_block_size=16, select_top_n=4,
    global_num_latent_heads=2, global_kv_lora_rank=8, initializer_range=0.1,
)


@pytest.fixture(scope="session")
def heldout_texts() -> list[str]:
    return [document.text for document in StdlibCorpus(["tomllib"])]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, heldout_texts) -> PreTrainedTokenizerFast:
    """A 400-token byte-level BPE, as the data pipeline saves it, loaded by transformers."""
    texts = [document.text for document in StdlibCorpus(["json"])] + heldout_texts
    folder = save_tokenizer(train_tokenizer(texts, vocab_size=400), tmp_path_factory.mktemp("t"))
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="session")
def random_model(tokenizer) -> ASAForCausalLM:
    torch.manual_seed(0)
    return ASAForCausalLM(ASAConfig(vocab_size=len(tokenizer), **TINY)).eval()


class CopyModel(torch.nn.Module):
    """An induction head as a Hugging Face-style causal LM: after the last `match` tokens it
    predicts the token that followed their latest earlier occurrence. Its cache is the
    token history."""

    def __init__(self, vocab_size: int, match: int = 3) -> None:
        super().__init__()
        self.vocab_size, self.match = vocab_size, match
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def next_token(self, row: list[int]) -> int:
        tail = row[-self.match :]
        for start in range(len(row) - self.match - 1, -1, -1):
            if row[start : start + self.match] == tail:
                return row[start + self.match]
        return 0

    def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
        history = input_ids if past_key_values is None else torch.cat(
            [past_key_values, input_ids], dim=1
        )
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b, row in enumerate(history.tolist()):
            logits[b, -1, self.next_token(row)] = 1.0
        return CausalLMOutputWithPast(
            logits=logits, past_key_values=history if use_cache else None
        )


@pytest.fixture(scope="session")
def copy_model(tokenizer) -> CopyModel:
    return CopyModel(len(tokenizer))
