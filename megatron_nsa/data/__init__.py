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
from .prepare import prepare_dataset
from .tokenizer import (
    EOD_TOKEN,
    PAD_TOKEN,
    MegatronTokenizerAdapter,
    MockTokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

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
