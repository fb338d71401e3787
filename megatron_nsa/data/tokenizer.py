"""A byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer folder (so it ships
with the exported model), and its adapter to Megatron's tokenizer interface.

Special tokens: the padding token has id 0 and end-of-document id 1. GPTDataset rewrites
padding in its samples to id 0; with padding at 0 that keeps padded positions distinct from
document ends.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from megatron.core.tokenizers import MegatronTokenizerBase
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<|pad|>"
EOD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOD_TOKEN)
DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_FILE = "tokenizer.json"


def new_tokenizer() -> Tokenizer:
    """An untrained GPT-2 style byte-level BPE: lossless on any text, no unknown tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *, length: int | None = None
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes, the special tokens, merges).

    Literal special-token strings in the text are encoded as text, so an `<|endoftext|>`
    inside a document never becomes a document boundary.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes + special tokens")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer = new_tokenizer()
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    tokenizer.encode_special_tokens = True
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: str | os.PathLike) -> Path:
    """Write a folder that `transformers.AutoTokenizer.from_pretrained` loads as a
    PreTrainedTokenizerFast (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / TOKENIZER_FILE))
    special = {"eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2**31 - 1,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


class MegatronTokenizerAdapter(MegatronTokenizerBase):
    """A saved tokenizer folder seen through Megatron's tokenizer interface (what GPTDataset and
    the training loop use: `eod`, `pad`, `vocab_size`, `tokenize`, `detokenize`,
    `unique_identifiers`). Reads tokenizer.json with `tokenizers` only, no transformers."""

    def __init__(self, folder: str | os.PathLike) -> None:
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{folder}: no {TOKENIZER_FILE} (looked for a saved tokenizer folder)")
        super().__init__(str(folder), {})
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.encode_special_tokens = True
        self._digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust thread pool)."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("a base-model tokenizer has no chat template")

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: token for token, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._tokenizer.token_to_id(EOD_TOKEN)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        return self._tokenizer.token_to_id(PAD_TOKEN)

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Part of GPTDataset's cache key: the folder and a digest of its tokenizer.json."""
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("tokenizer_path", str(self.path)),
                ("tokenizer_sha256", self._digest),
            ]
        )


class MockTokenizer(MegatronTokenizerBase):
    """For Megatron's MockGPTDataset when there is no corpus, hence no trained tokenizer: a
    vocabulary size and an EOD id (the last id), nothing to encode."""

    def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE) -> None:
        super().__init__("", {})
        self._vocab_size = vocab_size

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError("mock data has no text")

    def detokenize(self, ids: Iterable[int]) -> str:
        raise NotImplementedError("mock data has no text")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("mock data has no text")

    @property
    def vocab(self) -> dict[str, int]:
        return {}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", type(self).__qualname__), ("vocab_size", self._vocab_size)])


def load_tokenizer(folder: str | os.PathLike) -> MegatronTokenizerAdapter:
    return MegatronTokenizerAdapter(folder)
