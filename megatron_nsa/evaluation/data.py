"""The data of a quality comparison: a training set with some passkey documents mixed in, and
held-out stdlib packages that training never sees.

`prepare_quality_data` (command line: `python -m megatron_nsa.evaluation.prepare`) writes the
folder `examples/pretrain_asa.py --data` reads (tokenizer/, the indexed dataset,
summary.json) plus `heldout.jsonl` (the held-out documents' text, so every machine scores
the same text whatever its Python version) and `quality.json` (how the folder was made).
Everything is built in a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..data import Document, StdlibCorpus, prepare_dataset
from ..data.corpus import Corpus
from ..data.tokenizer import DEFAULT_VOCAB_SIZE
from .passkey import random_key, training_document

HELDOUT_PACKAGES = ("asyncio", "email")
"""Held out whole, with their test packages (test/test_asyncio, test/test_email)."""
HELDOUT_FILE = "heldout.jsonl"
MANIFEST_FILE = "quality.json"
CHARS_PER_TOKEN = 3.6
"""Characters per token of the 8k-token stdlib BPE (8.67M tokens for 31.6 MB); only sizes
the passkey documents, so an estimate is enough."""


def top_level(name: str) -> str:
    """The stdlib top-level name of a corpus document ("email/mime" -> "email",
    "test[3]" -> "test")."""
    return name.split("/")[0].split("[")[0]


def held_out(name: str, packages: Sequence[str]) -> bool:
    """Whether a document belongs to a held-out package or to that package's tests."""
    head = top_level(name)
    tests = tuple(f"test/test_{package}" for package in packages)
    return head in packages or name.startswith(tests)


class PasskeyMixCorpus:
    """A corpus's documents (minus those `exclude` names), each followed by passkey
    documents cut from its own lines, so that passkey documents make up about `fraction`
    of the characters. Their lengths are log-uniform in [min_tokens, max_tokens] (short
    distances are as common as long ones), the needle depth uniform. Deterministic:
    re-iterating yields the same documents."""

    def __init__(
        self,
        base: Corpus,
        *,
        exclude: Callable[[str], bool] = lambda name: False,
        fraction: float = 0.1,
        min_tokens: int = 128,
        max_tokens: int = 8128,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction={fraction} must be in [0, 1)")
        if not 1 <= min_tokens <= max_tokens:
            raise ValueError(
                f"min_tokens={min_tokens}, max_tokens={max_tokens}: need 1 <= min <= max"
            )
        self.base, self.exclude, self.fraction = base, exclude, fraction
        self.min_tokens, self.max_tokens, self.seed = min_tokens, max_tokens, seed
        self.name = base.name

    def passkey_documents(self, document: Document) -> Iterator[Document]:
        rng = random.Random(f"{self.seed}:{document.name}")
        low, high = math.log(self.min_tokens), math.log(self.max_tokens)
        mean_tokens = self.min_tokens  # of the log-uniform length
        if high > low:
            mean_tokens = (self.max_tokens - self.min_tokens) / (high - low)
        expected = self.fraction / (1 - self.fraction) * len(document.text)
        expected /= mean_tokens * CHARS_PER_TOKEN
        count = math.floor(expected) + (rng.random() < expected - math.floor(expected))
        lines = document.text.splitlines(keepends=True)
        for i in range(count):
            chars = math.exp(rng.uniform(low, high)) * CHARS_PER_TOKEN
            start = rng.randrange(len(lines))
            end, size = start, 0
            while end < len(lines) and size < chars:
                size += len(lines[end])
                end += 1
            key = random_key(rng)
            text = training_document(lines[start:end], key, rng.random())
            yield Document(f"{document.name}#passkey{i}", text)

    def __iter__(self) -> Iterator[Document]:
        for document in self.base:
            if self.exclude(document.name):
                continue
            yield document
            if self.fraction:
                yield from self.passkey_documents(document)


def write_jsonl(documents: Sequence[Document], path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for document in documents:
            out.write(json.dumps({"name": document.name, "text": document.text}) + "\n")


def read_heldout(folder: str | os.PathLike) -> list[str]:
    """The held-out texts of a folder made by `prepare_quality_data` (or a .jsonl file)."""
    path = Path(folder)
    path = path / HELDOUT_FILE if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path}: no held-out documents (make them with prepare_quality_data)")
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    if not texts:
        raise ValueError(f"{path}: holds no documents")
    return texts


def prepare_quality_data(
    out: str | os.PathLike,
    *,
    packages: Sequence[str] | None = None,
    heldout: Sequence[str] = HELDOUT_PACKAGES,
    passkey_fraction: float = 0.1,
    seq_length: int = 8192,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Prepare `out`: the training set (stdlib `packages`, default all, minus `heldout` and
    their tests, plus passkey documents of up to `seq_length` tokens) and heldout.jsonl."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass overwrite to replace it)")
    held = list(heldout)
    if not held:
        raise ValueError("heldout must name at least one stdlib package")
    overlap = sorted(set(packages or ()) & set(held))
    if overlap:
        raise ValueError(
            f"packages and heldout share {overlap}: held-out text must not be trained on"
        )
    heldout_documents = list(StdlibCorpus(held))
    corpus = PasskeyMixCorpus(
        StdlibCorpus(packages),
        exclude=lambda name: held_out(name, held),
        fraction=passkey_fraction,
        max_tokens=max(128, seq_length - 64),
        seed=seed,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        work = scratch / out.name
        summary = prepare_dataset(corpus, work, vocab_size=vocab_size, progress=progress)
        write_jsonl(heldout_documents, work / HELDOUT_FILE)
        sizes = [(len(d.text), "#passkey" in d.name) for d in corpus]
        passkey_chars = sum(size for size, passkey in sizes if passkey)
        manifest = {
            "training_packages": list(packages) if packages else "all",
            "heldout_packages": held,
            "heldout_documents": [d.name for d in heldout_documents],
            "heldout_chars": sum(len(d.text) for d in heldout_documents),
            "passkey_fraction": passkey_fraction,
            "passkey_documents": sum(passkey for _, passkey in sizes),
            "passkey_char_share": passkey_chars / sum(size for size, _ in sizes),
            "seq_length": seq_length,
            "seed": seed,
            "dataset": summary,
        }
        (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rename(scratch / "replaced")
        work.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest
