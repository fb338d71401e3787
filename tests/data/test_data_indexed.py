"""The .bin/.idx written with Megatron's builder reads back to the tokenized documents."""

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_nsa.data import Document, StdlibCorpus, write_indexed_dataset


def test_reads_back_exactly_the_documents_with_eod(prepared, tokenizer, packages):
    out, summary = prepared
    dataset = IndexedDataset(str(out / summary["dataset_prefix"]))
    documents = list(StdlibCorpus(packages))
    assert len(dataset) == len(documents) == summary["documents"]
    assert dataset.sequence_lengths.sum() == summary["tokens"]
    assert dataset.sequence_lengths.max() == summary["longest_document_tokens"]
    assert list(dataset.document_indices) == list(range(len(documents) + 1))
    for i, document in enumerate(documents):
        expected = tokenizer.tokenize(document.text) + [tokenizer.eod]
        assert np.array_equal(dataset[i], expected)
        assert dataset[i].dtype == np.uint16


def test_failure_midway_leaves_no_files(tmp_path, tokenizer):
    def documents():
        yield Document("first", "x = 1\n")
        raise RuntimeError("reader broke")

    with pytest.raises(RuntimeError, match="reader broke"):
        write_indexed_dataset(documents(), tokenizer, tmp_path / "broken_text_document")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_a_dataset(tmp_path, tokenizer):
    prefix = tmp_path / "d_text_document"
    write_indexed_dataset([Document("a", "a = 1\n")], tokenizer, prefix)
    stats = write_indexed_dataset(
        [Document("b", "b = 2\n"), Document("c", "c = 3\n")], tokenizer, prefix, batch_size=1
    )
    assert (stats.documents, stats.longest_document) == (2, "b")
    assert len(IndexedDataset(str(prefix))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "d_text_document.bin",
        "d_text_document.idx",
    ]
