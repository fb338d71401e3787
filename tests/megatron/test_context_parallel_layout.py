"""The context-parallel layout's arithmetic, checked token by token against the definitions
(no processes): which rank compresses each block, where its tokens sit in the chunks-with-
halos tensor, where each compressed token lands in the all-gather, and how query pieces
slice their inputs."""

from __future__ import annotations

import pytest
import torch

from megatron_nsa.context_parallel import ContextParallelLayout, QueryPiece, run_pieces
from nsa_kernels import compressed_cu_seqlens, num_compressed_blocks

# (P, document lengths, block size, stride): single sequences and packed documents, chunks
# longer and shorter than a block (P = 8: chunks of 6 with blocks of 8), strides that do and
# do not divide the chunk length.
CASES = [
    (2, (96,), 8, 4),
    (4, (96,), 8, 4),
    (8, (96,), 8, 4),
    (3, (60, 12, 42), 8, 2),
    (2, (128, 4), 32, 16),
    (4, (8 * 37,), 16, 16),
]


@pytest.mark.parametrize(("size", "docs", "block", "stride"), CASES)
def test_every_compression_block_has_one_owner(size, docs, block, stride):
    """Each block is compressed by exactly one chunk, the one holding its last token, from
    rows of the chunks-with-halos tensor that hold the block's tokens in order; the gather
    order puts every compressed token at its owner's row."""
    layouts = [ContextParallelLayout(size, rank, docs) for rank in range(size)]
    starts = [0, *torch.tensor(docs).cumsum(0).tolist()]
    rows = layouts[0].compressed_rows(block, stride)
    owner_row = {}
    for rank, layout in enumerate(layouts):
        keys = layout.window_key_positions(block - 1, "cpu")  # document positions
        row = rank * rows
        for piece, segment in zip(layout.compression_pieces(block, stride), layout.segments,
                                  strict=True):
            assert piece.blocks == num_compressed_blocks(piece.length, block, stride)
            for j in range(piece.blocks):
                i = piece.first_block + j
                tokens = keys[piece.start + j * stride : piece.start + j * stride + block]
                assert tokens.tolist() == list(range(i * stride, i * stride + block))
                last = i * stride + block - 1
                assert segment.doc_offset <= last < segment.doc_offset + segment.length
                assert (piece.doc, i) not in owner_row
                owner_row[(piece.doc, i)] = row
                row += 1
        assert row <= (rank + 1) * rows
    expected = [
        owner_row[(doc, i)]
        for doc, length in enumerate(docs)
        for i in range(num_compressed_blocks(length, block, stride))
    ]
    assert len(owner_row) == len(expected)
    order = layouts[0].compressed_order(block, stride, "cpu")
    assert order.tolist() == expected
    cu = compressed_cu_seqlens(torch.tensor(starts), block, stride)
    assert list(layouts[0].compressed_starts(block, stride)) == cu[:-1].tolist()


@pytest.mark.parametrize(("size", "docs", "block", "stride"), CASES)
def test_causal_pieces_name_their_compressed_tokens(size, docs, block, stride):
    cu = compressed_cu_seqlens(torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()]),
                               block, stride)
    for rank in range(size):
        layout = ContextParallelLayout(size, rank, docs)
        plain = layout.causal_pieces()
        for piece, bare in zip(layout.causal_pieces((block, stride)), plain, strict=True):
            assert (piece.q_start, piece.q_len, piece.k_start, piece.k_len) == (
                bare.q_start, bare.q_len, bare.k_start, bare.k_len)
            assert piece.cmp_start == cu[piece.doc]
            assert piece.cmp_len == num_compressed_blocks(piece.k_len, block, stride)
            assert piece.cmp_start + piece.cmp_len <= cu[piece.doc + 1]


def test_run_pieces_slices_each_input_on_its_token_axis():
    pieces = [QueryPiece(0, 2, 0, 5, 0, 1, 2), QueryPiece(2, 3, 5, 3, 0, 0, 1)]
    q = torch.arange(5)[None, None]  # token axis 2
    k = torch.arange(100, 108)[None, None]
    c = torch.arange(200, 203)[None, None]
    calls = run_pieces(pieces, lambda q, k, c, q_offset: (q, k, c, q_offset),
                       queries=(q,), keys=(k,), compressed=(c,), dim=2)
    assert [(q.flatten().tolist(), k.flatten().tolist(), c.flatten().tolist(), o)
            for q, k, c, o in calls] == [
        ([0, 1], [100, 101, 102, 103, 104], [201, 202], 3),
        ([2, 3, 4], [105, 106, 107], [200], 0),
    ]
    with pytest.raises(ValueError, match="query pieces cover 5 tokens, the query has 6"):
        run_pieces(pieces, lambda q, q_offset: q, queries=(torch.zeros(1, 6),))
