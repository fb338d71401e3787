"""Where every token lives under Megatron's load-balanced context-parallel split.

Megatron cuts each sequence (each packed document, for THD batches) into 2P equal chunks and
gives CP rank r chunks r and 2P-1-r, in that order (`get_batch_on_this_cp_rank`, or TE's
`thd_get_partitioned_indices` for packed documents). Core attention sees no position ids, so
the layout is rebuilt from (P, r, local length, cu_seqlens): the global position of every
local token, which rank holds any global token, and the query pieces each layer kind runs
(`run_pieces` runs an op once per piece).

Everything here is arithmetic on Python ints, the same on every rank, so every rank knows
what every other rank sends and receives without asking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from nsa_kernels import num_compressed_blocks


@dataclass(frozen=True)
class Segment:
    """One chunk held by this rank: local tokens [local_start, local_start + length) are the
    global (packed) tokens [global_start, global_start + length) of document `doc`, which
    starts at global token `doc_start`."""

    local_start: int
    global_start: int
    length: int
    doc: int
    doc_start: int

    @property
    def doc_offset(self) -> int:
        """Position of the chunk's first token inside its document."""
        return self.global_start - self.doc_start


@dataclass(frozen=True)
class QueryPiece:
    """One call of an attention op: queries [q_start, q_start + q_len) of this rank against
    keys [k_start, k_start + k_len) of the key tensor the core attention receives; the
    queries are the last q_len of those keys (`q_offset` = k_len - q_len). `doc` names the
    document. Pieces of the compressing layers also name the compressed tokens of their
    keys: [cmp_start, cmp_start + cmp_len) of the sequence's compressed tokens, document by
    document (as `compressed_cu_seqlens` orders them)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    doc: int
    cmp_start: int = 0
    cmp_len: int = 0

    @property
    def q_offset(self) -> int:
        return self.k_len - self.q_len

    @property
    def queries(self) -> slice:
        return slice(self.q_start, self.q_start + self.q_len)

    @property
    def keys(self) -> slice:
        return slice(self.k_start, self.k_start + self.k_len)

    @property
    def compressed(self) -> slice:
        return slice(self.cmp_start, self.cmp_start + self.cmp_len)


@dataclass(frozen=True)
class CompressionPiece:
    """The compression blocks one chunk owns, those whose last token it holds: blocks
    [first_block, first_block + blocks) of document `doc`, made from rows
    [start, start + length) of the chunks-with-halos tensor (`window_pieces(block_size - 1)`
    keys), which begin at the first block's first token."""

    start: int
    length: int
    doc: int
    first_block: int
    blocks: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.length)


@dataclass(frozen=True)
class ContextParallelLayout:
    """The split of one batch over the CP group.

    `doc_lengths` holds the (padded) length of every packed document, or the one sequence
    length for [s, b] batches; each is a multiple of 2P, cut into 2P chunks.
    """

    size: int  # P
    rank: int  # r
    doc_lengths: tuple[int, ...]

    @staticmethod
    def of_rank(
        size: int, rank: int, global_length: int, cu_seqlens: torch.Tensor | None = None
    ) -> ContextParallelLayout:
        """The layout rank `rank` of `size` gets for a batch of `global_length` tokens, or of
        the packed documents `cu_seqlens` (global offsets) describe. No checks: `build` is
        the checked way in, this one also serves to split data (`local_indices`)."""
        if cu_seqlens is None:
            return ContextParallelLayout(size, rank, (global_length,))
        bounds = [int(b) for b in cu_seqlens.tolist()]
        return ContextParallelLayout(
            size, rank, tuple(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        )

    @staticmethod
    def build(
        group: torch.distributed.ProcessGroup,
        local_length: int,
        cu_seqlens: torch.Tensor | None = None,
    ) -> ContextParallelLayout:
        """The layout of this rank's `local_length` tokens; raises before any communication
        when the batch cannot have come from Megatron's split."""
        size = group.size()
        layout = ContextParallelLayout.of_rank(
            size, group.rank(), local_length * size, cu_seqlens
        )
        if cu_seqlens is None:
            if local_length % 2:
                raise ValueError(
                    f"context parallelism splits each sequence into 2 * {size} = {2 * size} "
                    f"equal chunks, but this rank holds {local_length} tokens (sequence "
                    f"length {local_length * size}); use a sequence length divisible by "
                    f"{2 * size}"
                )
            return layout
        bad = [(d, n) for d, n in enumerate(layout.doc_lengths) if n % (2 * size)]
        if bad:
            raise ValueError(
                f"context parallelism splits each packed document into 2 * {size} = "
                f"{2 * size} equal chunks, but document(s) {bad} (index, length) are not "
                f"multiples of {2 * size}; pad each document to a multiple of {2 * size} "
                "(cu_seqlens_q_padded)"
            )
        if layout.global_length != local_length * size:
            raise ValueError(
                f"cu_seqlens cover {layout.global_length} tokens but {size} ranks of "
                f"{local_length} tokens hold {local_length * size}: pass the global (padded) "
                "cu_seqlens"
            )
        return layout

    def local_indices(self, device: torch.device | None = None) -> torch.Tensor:
        """[local length] global index of every token of this rank, in local order: what
        Megatron's `get_batch_on_this_cp_rank` (or TE's `thd_get_partitioned_indices` for
        packed documents) selects, usable without Transformer Engine."""
        return torch.cat(
            [torch.arange(s.global_start, s.global_start + s.length, device=device)
             for s in self.segments]
        )

    @property
    def global_length(self) -> int:
        return sum(self.doc_lengths)

    @property
    def local_length(self) -> int:
        return self.global_length // self.size

    @cached_property
    def doc_starts(self) -> tuple[int, ...]:
        starts, total = [], 0
        for n in self.doc_lengths:
            starts.append(total)
            total += n
        return tuple(starts)

    def chunks_of(self, rank: int) -> tuple[int, int]:
        """The two chunk indices (0..2P-1) rank `rank` holds in every document."""
        return rank, 2 * self.size - 1 - rank

    def segments_of(self, rank: int) -> list[Segment]:
        """Chunks held by `rank`, in its local order: per document, chunk r then 2P-1-r."""
        segments, local = [], 0
        for doc, (start, length) in enumerate(zip(self.doc_starts, self.doc_lengths, strict=True)):
            chunk = length // (2 * self.size)
            for index in self.chunks_of(rank):
                segments.append(Segment(local, start + index * chunk, chunk, doc, start))
                local += chunk
        return segments

    @cached_property
    def segments(self) -> list[Segment]:
        """This rank's chunks."""
        return self.segments_of(self.rank)

    def positions(self, device: torch.device) -> torch.Tensor:
        """[local length] position of every local token inside its document (RoPE)."""
        return torch.cat(
            [torch.arange(s.doc_offset, s.doc_offset + s.length, device=device)
             for s in self.segments]
        )

    def gathered_order(self, device: torch.device) -> torch.Tensor:
        """[global length] int64: for each global token, its row in the rank-major buffer an
        all-gather returns (rank p's local tokens at rows p * local_length + i). Cached: every
        layer of a step asks for the same one."""
        return _gathered_order(self, torch.device(device))

    def _build_gathered_order(self, device: torch.device) -> torch.Tensor:
        order = torch.empty(self.global_length, dtype=torch.long)
        for rank in range(self.size):
            for s in self.segments_of(rank):
                first = rank * self.local_length + s.local_start
                order[s.global_start : s.global_start + s.length] = torch.arange(
                    first, first + s.length
                )
        return order.to(device)

    def locate(self, global_start: int, length: int) -> list[tuple[int, int, int, int]]:
        """Global tokens [global_start, global_start + length) as runs (rank, local start,
        global start, length), each within one chunk of one rank."""
        runs = []
        for rank in range(self.size):
            for s in self.segments_of(rank):
                lo = max(global_start, s.global_start)
                hi = min(global_start + length, s.global_start + s.length)
                if lo < hi:
                    runs.append((rank, s.local_start + lo - s.global_start, lo, hi - lo))
        return sorted(runs, key=lambda run: run[2])

    def halo_lengths(self, halo: int, rank: int | None = None) -> list[int]:
        """Tokens before each chunk of `rank` (default this one) that a window of `halo`
        previous tokens reaches, stopping at the document start."""
        segments = self.segments if rank is None else self.segments_of(rank)
        return [min(halo, s.doc_offset) for s in segments]

    def window_pieces(self, halo: int) -> list[QueryPiece]:
        """Pieces of the local layers: each chunk against its halo and itself, the key tensor
        being [halo_0 ; chunk_0 ; halo_1 ; chunk_1 ; ...]."""
        pieces, k_start = [], 0
        for s, h in zip(self.segments, self.halo_lengths(halo), strict=True):
            pieces.append(QueryPiece(s.local_start, s.length, k_start, h + s.length, s.doc))
            k_start += h + s.length
        return pieces

    def window_key_positions(self, halo: int, device: torch.device) -> torch.Tensor:
        """[sum of halo + chunk lengths] document positions of the keys of `window_pieces`."""
        return torch.cat(
            [torch.arange(s.doc_offset - h, s.doc_offset + s.length, device=device)
             for s, h in zip(self.segments, self.halo_lengths(halo), strict=True)]
        )

    def causal_pieces(self, compression: tuple[int, int] | None = None) -> list[QueryPiece]:
        """Pieces of the layers that gather the whole sequence: each chunk against every key
        of its document up to the chunk's end, the key tensor being in global order. With
        `compression` (block size, stride) each piece also names the compressed tokens of
        its keys."""
        pieces = []
        for s in self.segments:
            keys = s.doc_offset + s.length
            cmp_start = cmp_len = 0
            if compression is not None:
                cmp_start = self.compressed_starts(*compression)[s.doc]
                cmp_len = num_compressed_blocks(keys, *compression)
            pieces.append(
                QueryPiece(s.local_start, s.length, s.doc_start, keys, s.doc, cmp_start, cmp_len)
            )
        return pieces

    def compressed_starts(self, block_size: int, stride: int) -> tuple[int, ...]:
        """Index of each document's first compressed token in the whole sequence's."""
        starts, total = [], 0
        for n in self.doc_lengths:
            starts.append(total)
            total += num_compressed_blocks(n, block_size, stride)
        return tuple(starts)

    def compression_pieces(
        self, block_size: int, stride: int, rank: int | None = None
    ) -> list[CompressionPiece]:
        """The blocks each chunk of `rank` (default this one) compresses: those whose last
        token it holds. Block i covers [i*s, i*s + l) of its document, so a chunk starting at
        document position o owns blocks i >= ceil((o - l + 1) / s) and needs the l - 1 tokens
        before it: the rows of `window_pieces(l - 1)`'s key tensor."""
        halo = block_size - 1
        segments = self.segments if rank is None else self.segments_of(rank)
        pieces, row = [], 0
        for s, h in zip(segments, self.halo_lengths(halo, rank), strict=True):
            first = max(0, -((halo - s.doc_offset) // stride))  # ceil((o - l + 1) / s)
            start = first * stride  # document position of the first block's first token
            length = s.doc_offset + s.length - start
            skip = start - (s.doc_offset - h)
            pieces.append(CompressionPiece(
                row + skip, length, s.doc, first, num_compressed_blocks(length, block_size, stride)
            ))
            row += h + s.length
        return pieces

    def compressed_rows(self, block_size: int, stride: int) -> int:
        """The most compressed tokens any rank owns: each rank's share of the compressed
        all-gather, padded to this."""
        return max(
            sum(p.blocks for p in self.compression_pieces(block_size, stride, rank))
            for rank in range(self.size)
        )

    def compressed_order(self, block_size: int, stride: int, device: torch.device) -> torch.Tensor:
        """[compressed tokens of the sequence] int64: for each, its row in the rank-major
        buffer a compressed all-gather returns (rank p's blocks from row p * rows, rows =
        `compressed_rows`). Cached like `gathered_order`."""
        return _compressed_order(self, block_size, stride, torch.device(device))

    def _build_compressed_order(self, block_size: int, stride: int) -> torch.Tensor:
        starts = self.compressed_starts(block_size, stride)
        total = starts[-1] + num_compressed_blocks(self.doc_lengths[-1], block_size, stride)
        rows = self.compressed_rows(block_size, stride)
        order = torch.empty(total, dtype=torch.long)
        for rank in range(self.size):
            row = rank * rows
            for p in self.compression_pieces(block_size, stride, rank):
                first = starts[p.doc] + p.first_block
                order[first : first + p.blocks] = torch.arange(row, row + p.blocks)
                row += p.blocks
        return order

    def check_chunk_multiple(self, multiple: int, what: str) -> None:
        """Refuse chunks whose starts are not multiples of `multiple` (e.g. query blocks
        that share one selection must not straddle two ranks)."""
        chunks = {n // (2 * self.size) for n in self.doc_lengths}
        bad = sorted(chunk for chunk in chunks if chunk % multiple)
        if bad:
            raise ValueError(
                f"{what}={multiple} must divide the context-parallel chunk length (sequence "
                f"length / {2 * self.size}); got chunks of {bad} tokens. Use a sequence "
                f"length divisible by {2 * self.size * multiple}"
            )


def run_pieces(
    pieces: Sequence[QueryPiece],
    fn: Callable[..., object],
    *,
    queries: Sequence[torch.Tensor] = (),
    keys: Sequence[torch.Tensor] = (),
    compressed: Sequence[torch.Tensor] = (),
    dim: int = 1,
) -> list:
    """[fn(*queries, *keys, *compressed, q_offset=piece.q_offset) for each piece], each
    tensor sliced along its token axis `dim` to the piece's queries, keys or compressed
    tokens. The pieces must cover the queries, in order."""
    covered = sum(piece.q_len for piece in pieces)
    if queries and covered != queries[0].shape[dim]:
        raise ValueError(
            f"query pieces cover {covered} tokens, the query has {queries[0].shape[dim]}"
        )

    def part(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
        return tensor[(slice(None),) * dim + (rows,)]

    return [
        fn(
            *(part(t, piece.queries) for t in queries),
            *(part(t, piece.keys) for t in keys),
            *(part(t, piece.compressed) for t in compressed),
            q_offset=piece.q_offset,
        )
        for piece in pieces
    ]


@lru_cache(maxsize=16)
def _gathered_order(layout: ContextParallelLayout, device: torch.device) -> torch.Tensor:
    return layout._build_gathered_order(device)


@lru_cache(maxsize=16)
def _compressed_order(
    layout: ContextParallelLayout, block_size: int, stride: int, device: torch.device
) -> torch.Tensor:
    return layout._build_compressed_order(block_size, stride).to(device)
