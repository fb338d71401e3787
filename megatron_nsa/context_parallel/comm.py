"""The context-parallel exchanges, as autograd functions, and what they cost.

- `start_halos`: point-to-point, started asynchronously. Each chunk receives the tokens just
  before it (the halo of a sliding window, or of a compression block) from the ranks that
  hold them; `wait()` returns the chunks with their halos in front. The backward sends the
  halo's gradient back and adds it where the tokens came from.
- `start_gather` / `start_compressed_gather`: all-gather into global token order, started
  asynchronously so the caller can compute meanwhile; the backward reduce-scatters the
  gradient (a sum over the ranks whose queries read each token) in fp32.

`bytes_sent` counts, per layer and direction, the payload this rank puts on the wire (a
ring all-gather of n bytes per rank sends (P - 1) n; a reduce-scatter of P n sends
(P - 1) n), so tests and benchmarks can check it against the formulas in
docs/context_parallel.md. `comm_timer`, off by default, times every exchange.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import ContextParallelLayout


class ExchangeCounter(Counter):
    """Amounts keyed (layer number, exchange, "forward" | "backward")."""

    def total(self, layer: int | None = None, exchange: str | None = None,
              phase: str | None = None) -> float:
        """Sum over the keys that match every given field."""
        return sum(
            n for (key_layer, key_exchange, key_phase), n in self.items()
            if layer in (None, key_layer) and exchange in (None, key_exchange)
            and phase in (None, key_phase)
        )


class ByteCounter(ExchangeCounter):
    """Bytes sent by this rank, keyed (layer number, exchange, "forward" | "backward")."""


bytes_sent = ByteCounter()
"""This process's counter; tests and benchmarks `clear()` and read it."""


class CommTimer:
    """Opt-in timing of every exchange, in ms per (layer, exchange, phase).

    Off by default, when it costs one attribute test per exchange. While on, each exchange
    is waited for where it is issued (no overlap), so its span, from issue to completion,
    is its own: CUDA events on the current stream, or wall time on CPU. The sum is what the
    exchanges cost without overlap, waiting for slower peers included.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._spans: list[tuple[tuple, object, object]] = []

    def start(self) -> None:
        """Clear and start timing."""
        self._spans.clear()
        self.enabled = True

    def stop(self) -> ExchangeCounter:
        """Stop timing; ms per key since `start` (waits for the timed GPU work to finish)."""
        self.enabled = False
        ms = ExchangeCounter()
        for key, begin, end in self._spans:
            if isinstance(begin, float):
                ms[key] += (end - begin) * 1e3
            else:
                end.synchronize()
                ms[key] += begin.elapsed_time(end)
        self._spans.clear()
        return ms

    def span(self, key: tuple, device: torch.device):
        """A context that times its body under `key` while the timer is on."""
        return self._span(key, device) if self.enabled else _OFF

    @contextmanager
    def _span(self, key: tuple, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
        else:
            begin = time.perf_counter()
            yield
            end = time.perf_counter()
        self._spans.append((key, begin, end))


_OFF = nullcontext()
comm_timer = CommTimer()
"""This process's timer: `comm_timer.start()`, run steps, `comm_timer.stop()` -> ms."""


def _issue(key: tuple, device: torch.device, issue: Callable[[], list]) -> list:
    """issue() -> the work handles of an asynchronous exchange; with the timer on they are
    waited for inside its span (and none is returned)."""
    if not comm_timer.enabled:
        return issue()
    with comm_timer.span(key, device):
        for work in issue():
            work.wait()
    return []


@dataclass(frozen=True)
class Transfer:
    """Tokens [src_start, src_start + length) of rank `src` become tokens
    [dst_start, dst_start + length) of rank `dst`'s halo buffer."""

    src: int
    src_start: int
    dst: int
    dst_start: int
    length: int


def halo_plan(layout: ContextParallelLayout, halo: int) -> list[Transfer]:
    """Every transfer of a halo exchange, in one order that every rank computes alike.

    The halo buffer of rank p is [halo of its chunk 0 ; halo of its chunk 1 ; ...] with the
    lengths `layout.halo_lengths(halo, p)`; a halo longer than the chunk before it is taken
    from several chunks (and ranks).
    """
    plan = []
    for dst in range(layout.size):
        offset = 0
        for segment, length in zip(
            layout.segments_of(dst), layout.halo_lengths(halo, dst), strict=True
        ):
            first = segment.global_start - length
            for src, src_start, global_start, run in layout.locate(first, length):
                plan.append(Transfer(src, src_start, dst, offset + global_start - first, run))
            offset += length
    return plan


class _PointToPoint:
    """One run of a halo plan, in flight: token rows of `source` into halo rows of `target`,
    or with `reverse` halo-gradient rows of `source` added into token rows of `target`.

    source and target are [rows, ...] of this rank. Transfers between ranks are one batch
    of isend/irecv (tags keep several transfers between two ranks apart); `wait()` writes
    what arrived, and the transfers within this rank, into `target`.
    """

    def __init__(
        self,
        plan: list[Transfer],
        source: torch.Tensor,
        target: torch.Tensor,
        group: dist.ProcessGroup,
        reverse: bool,
        key: tuple,
    ) -> None:
        rank = group.rank()
        self.target, self.reverse = target, reverse
        self.ops, self.received, sent = [], [], 0
        for tag, t in enumerate(plan):
            (src, src_start), (dst, dst_start) = (t.src, t.src_start), (t.dst, t.dst_start)
            if reverse:
                (src, src_start), (dst, dst_start) = (dst, dst_start), (src, src_start)
            src_rows = slice(src_start, src_start + t.length)
            dst_rows = slice(dst_start, dst_start + t.length)
            if src == rank and dst == rank:
                self.received.append((dst_rows, source[src_rows]))
            elif src == rank:
                payload = source[src_rows].contiguous()
                peer = dist.get_global_rank(group, dst)
                self.ops.append(dist.P2POp(dist.isend, payload, peer, group, tag))
                sent += payload.numel() * payload.element_size()
            elif dst == rank:
                buffer = torch.empty_like(target[dst_rows])
                peer = dist.get_global_rank(group, src)
                self.ops.append(dist.P2POp(dist.irecv, buffer, peer, group, tag))
                self.received.append((dst_rows, buffer))
        bytes_sent[key] += sent
        self.works = _issue(
            key, source.device, lambda: dist.batch_isend_irecv(self.ops) if self.ops else []
        )

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []
        for rows, values in self.received:
            if self.reverse:
                self.target[rows] += values
            else:
                self.target[rows] = values


class PendingHalos:
    """A halo exchange in flight; `wait()` returns x [local tokens, ...] as
    [halo_0 ; chunk_0 ; halo_1 ; chunk_1 ; ...], part of the autograd graph."""

    def __init__(
        self,
        x: torch.Tensor,
        layout: ContextParallelLayout,
        halo: int,
        group: dist.ProcessGroup,
        key: tuple[int, str],
    ) -> None:
        self.x, self.group, self.key = x, group, key
        self.plan = halo_plan(layout, halo)
        self.lengths = layout.halo_lengths(halo)
        self.chunks = [segment.length for segment in layout.segments]
        self.halos = x.new_empty(sum(self.lengths), *x.shape[1:])
        self.transfer = _PointToPoint(
            self.plan, x.detach(), self.halos, group, reverse=False, key=(*key, "forward")
        )

    def wait(self) -> torch.Tensor:
        self.transfer.wait()
        return _WithHalos.apply(
            self.x, self.halos, self.plan, self.lengths, self.chunks, self.group, self.key
        )


class _WithHalos(torch.autograd.Function):
    """x [local tokens, ...] and the received halos -> [halo_0 ; chunk_0 ; ...]; the
    backward sends the halos' gradient back to the ranks their tokens came from."""

    @staticmethod
    def forward(ctx, x, halos, plan, lengths, chunks, group, key):
        ctx.plan, ctx.lengths, ctx.chunks, ctx.group, ctx.key = plan, lengths, chunks, group, key
        parts = []
        for halo, chunk in zip(halos.split(lengths), x.split(chunks), strict=True):
            parts += [halo, chunk]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        sizes = [n for pair in zip(ctx.lengths, ctx.chunks, strict=True) for n in pair]
        parts = grad.split(sizes)
        grad_halos = torch.cat(parts[0::2])
        grad_x = torch.cat(parts[1::2])
        _PointToPoint(
            ctx.plan, grad_halos, grad_x, ctx.group, reverse=True, key=(*ctx.key, "backward")
        ).wait()
        return grad_x, None, None, None, None, None, None


def start_halos(
    x: torch.Tensor,
    layout: ContextParallelLayout,
    halo: int,
    group: dist.ProcessGroup,
    layer_number: int,
    what: str = "halo",
) -> PendingHalos:
    """Start fetching, for each of this rank's chunks of x [local tokens, ...], the up to
    `halo` tokens before it in its document from the ranks that hold them (the keys of
    `layout.window_pieces(halo)`); see `PendingHalos`."""
    return PendingHalos(x, layout, halo, group, (layer_number, what))


def with_halos(
    x: torch.Tensor,
    layout: ContextParallelLayout,
    halo: int,
    group: dist.ProcessGroup,
    layer_number: int,
) -> torch.Tensor:
    """`start_halos(...).wait()`: x [local tokens, ...] -> [halo_0 ; chunk_0 ; ...]."""
    return start_halos(x, layout, halo, group, layer_number).wait()


class _Gathered(torch.autograd.Function):
    """Identity on the already gathered buffer, reordered to global token order; the
    backward reduce-scatters the gradient back to the ranks' own tokens."""

    @staticmethod
    def forward(ctx, x, gathered, order, group, key):
        ctx.order, ctx.group, ctx.key, ctx.dtype = order, group, key, x.dtype
        ctx.tokens, ctx.rows = x.shape[0], gathered.shape[0]
        return gathered.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        size = ctx.group.size()
        grad32 = grad.float()
        # Rows no token maps to (a rank's padding) must add nothing.
        padded = ctx.rows != grad32.shape[0]
        rank_major = grad32.new_empty(ctx.rows, *grad32.shape[1:])
        if padded:
            rank_major.zero_()
        rank_major.index_copy_(0, ctx.order, grad32)
        out = grad32.new_empty(ctx.rows // size, *grad32.shape[1:])
        if out.shape[0]:
            with comm_timer.span((*ctx.key, "backward"), grad.device):
                dist.reduce_scatter_tensor(out, rank_major, group=ctx.group)
            bytes_sent[(*ctx.key, "backward")] += (size - 1) * out.numel() * out.element_size()
        return out[: ctx.tokens].to(ctx.dtype), None, None, None, None


class PendingGather:
    """An all-gather in flight; `wait()` returns its result as part of the autograd graph.

    x [n, ...] holds this rank's tokens, padded to `rows` (default n) for the collective;
    `order` [global tokens] gives each token's row in the rank-major gathered buffer.
    """

    def __init__(
        self,
        x: torch.Tensor,
        order: torch.Tensor,
        group: dist.ProcessGroup,
        key: tuple[int, str],
        rows: int | None = None,
    ) -> None:
        self.x, self.order, self.group, self.key = x, order, group, key
        rows = x.shape[0] if rows is None else rows
        payload = x.detach().contiguous()  # kept alive until the gather is done
        if rows > x.shape[0]:
            payload = torch.cat((payload, payload.new_zeros(rows - x.shape[0], *x.shape[1:])))
        self.payload = payload
        self.buffer = payload.new_empty(group.size() * rows, *x.shape[1:])
        self.works = []
        if rows:
            self.works = _issue(
                (*key, "forward"), x.device,
                lambda: [dist.all_gather_into_tensor(
                    self.buffer, self.payload, group=group, async_op=True
                )],
            )
            bytes_sent[(*key, "forward")] += (
                (group.size() - 1) * payload.numel() * payload.element_size()
            )

    def wait(self) -> torch.Tensor:
        """[global tokens, ...] in global (document) order."""
        for work in self.works:
            work.wait()
        self.works = []
        return _Gathered.apply(self.x, self.buffer, self.order, self.group, self.key)


def start_gather(
    x: torch.Tensor,
    layout: ContextParallelLayout,
    group: dist.ProcessGroup,
    layer_number: int,
    what: str,
) -> PendingGather:
    """Start all-gathering x [local tokens, ...] over the CP group (see `PendingGather`)."""
    return PendingGather(x, layout.gathered_order(x.device), group, (layer_number, what))


def start_compressed_gather(
    x: torch.Tensor,
    layout: ContextParallelLayout,
    block_size: int,
    stride: int,
    group: dist.ProcessGroup,
    layer_number: int,
) -> PendingGather:
    """Start all-gathering the compressed tokens x [blocks this rank owns, ...] (those of
    `layout.compression_pieces`, in order); `wait()` returns every compressed token of the
    sequence, document by document."""
    return PendingGather(
        x, layout.compressed_order(block_size, stride, x.device), group,
        (layer_number, "compressed"), layout.compressed_rows(block_size, stride),
    )
