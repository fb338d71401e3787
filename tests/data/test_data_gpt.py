"""GPTDataset over the written data: packed samples are contiguous windows of the token
stream, across document (and epoch) boundaries; document boundaries as cu_seqlens."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_nsa.data import (
    MockTokenizer,
    StdlibCorpus,
    WithDocumentBoundaries,
    build_gpt_datasets,
    collate_packed,
    cu_seqlens_from_tokens,
    write_indexed_dataset,
)

SMALL_MODULES = ["bisect", "colorsys", "fnmatch", "glob", "graphlib", "json", "keyword"]
SMALL_MODULES += ["sched", "shlex", "textwrap", "this"]


@pytest.fixture(scope="module")
def small_prefix(tmp_path_factory, tokenizer):
    """Eleven short documents (the longest about 23k tokens)."""
    prefix = tmp_path_factory.mktemp("small") / "small_text_document"
    write_indexed_dataset(StdlibCorpus(SMALL_MODULES), tokenizer, prefix)
    return str(prefix)


def _stream_and_starts(gpt):
    """The token stream in the dataset's document order, and where each document starts."""
    lengths = gpt.dataset.sequence_lengths[gpt.document_index]
    stream = np.concatenate([gpt.dataset[int(d)] for d in gpt.document_index])
    return stream, np.concatenate([[0], np.cumsum(lengths)])


@pytest.mark.parametrize("seq_length", [24_576, 65_536])
def test_samples_are_windows_of_the_packed_stream(small_prefix, tokenizer, seq_length):
    data = IndexedDataset(small_prefix)  # keep it alive: its arrays view its memory map
    assert seq_length > data.sequence_lengths.max()
    train, valid = build_gpt_datasets(
        small_prefix, tokenizer, seq_length, split="80,20,0", train_samples=6, valid_samples=2
    )
    for gpt in (train, valid):
        assert len(gpt) >= 2
        stream, starts = _stream_and_starts(gpt)
        for i in range(len(gpt)):
            sample = gpt[i]
            doc, offset = gpt.sample_index[gpt.shuffle_index[i]]
            begin = starts[doc] + offset
            window = torch.from_numpy(stream[begin : begin + seq_length + 1].astype(np.int64))
            assert sample["tokens"].shape == (seq_length,)
            assert torch.equal(sample["tokens"], window[:-1])
            assert torch.equal(sample["labels"], window[1:])
            assert (sample["tokens"] == tokenizer.eod).any()  # packed: spans several documents


def test_split_divides_documents(small_prefix, tokenizer):
    train, valid = build_gpt_datasets(small_prefix, tokenizer, 4096, split="80,20,0")
    assert sorted(set(train.indices) | set(valid.indices)) == list(range(len(SMALL_MODULES)))
    assert not set(train.indices) & set(valid.indices)
    with pytest.raises(ValueError, match="valid split"):
        build_gpt_datasets(small_prefix, tokenizer, 4096, split="99,1,0")


def test_document_boundaries(small_prefix, tokenizer):
    seq_length = 24_576
    train, _ = build_gpt_datasets(
        small_prefix,
        tokenizer,
        seq_length,
        split="80,20,0",
        train_samples=4,
        document_boundaries=True,
    )
    assert isinstance(train, WithDocumentBoundaries)
    samples = [train[i] for i in range(len(train))]
    for sample in samples:
        tokens, cu_seqlens = sample["tokens"], sample["cu_seqlens"]
        assert cu_seqlens.dtype == torch.int32
        assert cu_seqlens[0] == 0 and cu_seqlens[-1] == seq_length
        ends = cu_seqlens[1:-1].long()
        assert (tokens[ends - 1] == tokenizer.eod).all()
        assert int((tokens == tokenizer.eod).sum()) == len(ends) + int(tokens[-1] == tokenizer.eod)
        assert sample["max_seqlen"] == (cu_seqlens[1:] - cu_seqlens[:-1]).max()
        # positions restart in each document; no loss where the input is the EOD token
        for begin, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
            assert torch.equal(sample["position_ids"][begin:end], torch.arange(end - begin))
        assert torch.equal(sample["loss_mask"] == 0, tokens == tokenizer.eod)
    batch = collate_packed(samples[:2])
    assert batch["tokens"].shape == (2, seq_length)
    assert torch.equal(batch["cu_seqlens"], cu_seqlens_from_tokens(batch["tokens"], tokenizer.eod))
    assert batch["max_seqlen"] == max(s["max_seqlen"] for s in samples[:2])


def test_mock_data():
    tokenizer = MockTokenizer(1000)
    train, valid = build_gpt_datasets(
        None, tokenizer, 8192, train_samples=3, valid_samples=2, document_boundaries=True
    )
    assert len(train) >= 3 and len(valid) >= 2
    sample = train[0]
    assert sample["tokens"].shape == (8192,)
    assert int(sample["tokens"].max()) < tokenizer.vocab_size
    assert len(sample["cu_seqlens"]) > 2  # mock documents are shorter than 4096 tokens


def test_missing_dataset_is_a_value_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="nothing_text_document"):
        build_gpt_datasets(tmp_path / "nothing_text_document", tokenizer, 128)


def test_cu_seqlens_from_tokens():
    eod = 1
    sample = torch.tensor([5, 1, 7, 8, 1, 9])
    assert cu_seqlens_from_tokens(sample, eod).tolist() == [0, 2, 5, 6]
    assert cu_seqlens_from_tokens(sample, eod).dtype == torch.int32
    assert cu_seqlens_from_tokens(np.array([4, 5, 1]), eod).tolist() == [0, 3]
    assert cu_seqlens_from_tokens(torch.tensor([1, 1, 2]), eod).tolist() == [0, 1, 2, 3]
    assert cu_seqlens_from_tokens(torch.tensor([3, 4]), eod).tolist() == [0, 2]
    batch = torch.tensor([[5, 1, 7], [1, 8, 9], [2, 3, 1]])
    assert cu_seqlens_from_tokens(batch, eod).tolist() == [0, 2, 3, 4, 6, 9]
    with pytest.raises(ValueError, match="shape"):
        cu_seqlens_from_tokens(torch.zeros(2, 2, 2), eod)
