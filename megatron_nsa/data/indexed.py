"""Tokenize a corpus into Megatron's indexed dataset (.bin/.idx) with Megatron's own builder.

One Megatron document (a single sequence) per corpus document, with the end-of-document token
appended. Files are written under a temporary prefix and renamed at the end, so a reader never
sees a half-written dataset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from .corpus import Document
from .tokenizer import MegatronTokenizerAdapter


@dataclass
class DatasetStats:
    documents: int = 0
    tokens: int = 0
    longest_document_tokens: int = 0
    longest_document: str = ""

    def add(self, name: str, length: int) -> None:
        self.documents += 1
        self.tokens += length
        if length > self.longest_document_tokens:
            self.longest_document_tokens, self.longest_document = length, name

    def as_dict(self) -> dict:
        return asdict(self)


def _batches(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(documents)
    while batch := list(islice(iterator, size)):
        yield batch


def _remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def write_indexed_dataset(
    documents: Iterable[Document],
    tokenizer: MegatronTokenizerAdapter,
    prefix: str | os.PathLike,
    *,
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
) -> DatasetStats:
    """Write `prefix`.bin/.idx; return document and token counts (EOD tokens included).

    `progress` receives one line per batch of `batch_size` documents.
    """
    prefix = str(prefix)
    partial = f"{prefix}.partial-{os.getpid()}"
    stats = DatasetStats()
    start = time.perf_counter()
    builder = None
    try:
        builder = IndexedDatasetBuilder(
            get_bin_path(partial), dtype=DType.optimal_dtype(tokenizer.vocab_size)
        )
        for batch in _batches(documents, batch_size):
            ids_batch = tokenizer.tokenize_batch([document.text for document in batch])
            for document, ids in zip(batch, ids_batch, strict=True):
                tokens = np.append(np.asarray(ids, dtype=np.int64), tokenizer.eod)
                builder.add_document(tokens, [tokens.size])
                stats.add(document.name, tokens.size)
            if progress is not None:
                progress(
                    f"tokenized {stats.documents} documents, {stats.tokens:,} tokens, "
                    f"{time.perf_counter() - start:.1f} s"
                )
        builder.finalize(get_idx_path(partial))
    except BaseException:
        if builder is not None:
            builder.data_file.close()
        _remove(get_bin_path(partial), get_idx_path(partial))
        raise
    # Drop the old index first: an interruption between the renames leaves no dataset, never
    # a new .bin under an old .idx.
    _remove(get_idx_path(prefix))
    os.replace(get_bin_path(partial), get_bin_path(prefix))
    os.replace(get_idx_path(partial), get_idx_path(prefix))
    return stats


def dataset_prefix(folder: str | os.PathLike, name: str) -> Path:
    """Megatron-LM's naming: `<folder>/<name>_text_document`."""
    return Path(folder) / f"{name}_text_document"
