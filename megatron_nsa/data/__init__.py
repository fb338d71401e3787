"""Training data: corpus readers, a byte-level BPE tokenizer that ships with the model,
Megatron indexed datasets, and GPTDataset splits with document boundaries."""

from .corpus import Document, FolderCorpus, JsonlCorpus, StdlibCorpus, open_corpus
from .indexed import DatasetStats, dataset_prefix, write_indexed_dataset
from .loading import (
    WithDocumentBoundaries,
    build_gpt_datasets,
    collate_packed,
    cu_seqlens_from_tokens,
)
from .tokenizer import (
    EOD_TOKEN,
    PAD_TOKEN,
    MegatronTokenizerAdapter,
    MockTokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)


def __getattr__(name: str) -> object:
    """`prepare_dataset` is imported on first use, so that `python -m
    megatron_nsa.data.prepare` runs a module its package has not imported yet."""
    if name == "prepare_dataset":
        from .prepare import prepare_dataset

        return prepare_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EOD_TOKEN",
    "PAD_TOKEN",
    "DatasetStats",
    "Document",
    "FolderCorpus",
    "JsonlCorpus",
    "MegatronTokenizerAdapter",
    "MockTokenizer",
    "StdlibCorpus",
    "WithDocumentBoundaries",
    "build_gpt_datasets",
    "collate_packed",
    "cu_seqlens_from_tokens",
    "dataset_prefix",
    "load_tokenizer",
    "open_corpus",
    "prepare_dataset",
    "save_tokenizer",
    "train_tokenizer",
    "write_indexed_dataset",
]
