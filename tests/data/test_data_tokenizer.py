"""The trained BPE: lossless on code, loads in Hugging Face with the same ids, and fits
Megatron's tokenizer interface."""

import json

import pytest
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_nsa.data import EOD_TOKEN, PAD_TOKEN, StdlibCorpus, train_tokenizer

ODD_TEXT = "tabs\tand\r\nCRLF, unicode caf\u00e9 \u2603 \U0001f600, trailing spaces   \n\n"


@pytest.fixture(scope="module")
def code():
    """Real code the tokenizer was not trained on, plus awkward text."""
    return [d.text for d in StdlibCorpus(["textwrap", "shlex"])] + [ODD_TEXT]


def test_round_trip_on_real_code(tokenizer, code):
    for text in code:
        ids = tokenizer.tokenize(text)
        assert len(ids) < len(text.encode())
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.tokenize_batch(code) == [tokenizer.tokenize(t) for t in code]


def test_special_tokens_and_vocab(tokenizer, vocab_size):
    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == vocab_size
    assert (tokenizer.pad, tokenizer.eod) == (0, 1)
    assert tokenizer.vocab[EOD_TOKEN] == 1 and tokenizer.inv_vocab[0] == PAD_TOKEN
    # a literal special-token string inside a document is text, not a document boundary
    ids = tokenizer.tokenize(f"a {EOD_TOKEN} b")
    assert tokenizer.eod not in ids and tokenizer.detokenize(ids) == f"a {EOD_TOKEN} b"
    json.dumps(tokenizer.unique_identifiers)


def test_loads_with_autotokenizer_giving_the_same_ids(prepared, tokenizer, vocab_size, code):
    transformers = pytest.importorskip("transformers")
    out, summary = prepared
    hf = transformers.AutoTokenizer.from_pretrained(out / summary["tokenizer"])
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert (hf.eos_token_id, hf.pad_token_id, len(hf)) == (1, 0, vocab_size)
    for text in code:
        ids = tokenizer.tokenize(text)
        assert hf(text, add_special_tokens=True)["input_ids"] == ids
        assert hf.decode(ids) == text


def test_vocab_size_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)
