"""The context-parallel exchanges, as autograd functions, and the bytes they send.

- `with_halos`: point-to-point. Each chunk receives the tokens just before it (the halo of
  a sliding window) from the ranks that hold them; the backward sends the halo's gradient
  back and adds it where the tokens came from.
- `start_gather`: all-gather into global token order, started asynchronously so the caller
  can compute meanwhile; the backward reduce-scatters the gradient (a sum over the ranks
  whose queries read each token) in fp32.

`bytes_sent` counts, per layer and direction, the payload this rank puts on the wire (a
ring all-gather of n bytes per rank sends (P - 1) n; a reduce-scatter of P n sends
(P - 1) n), so tests and benchmarks can check it against the formulas in
docs/context_parallel.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import ContextParallelLayout


class ByteCounter(Counter):
    """Bytes sent by this rank, keyed (layer number, exchange, "forward" | "backward")."""

    def total(self, layer: int | None = None, exchange: str | None = None,
              phase: str | None = None) -> int:
        """Sum over the keys that match every given field."""
        return sum(
            n for (key_layer, key_exchange, key_phase), n in self.items()
            if layer in (None, key_layer) and exchange in (None, key_exchange)
            and phase in (None, key_phase)
        )


bytes_sent = ByteCounter()
"""This process's counter; tests and benchmarks `clear()` and read it."""


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


def _exchange(
    plan: list[Transfer],
    source: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup,
    reverse: bool,
) -> int:
    """Run the plan: token rows of `source` into halo rows of `target`, or with `reverse`
    halo-gradient rows of `source` added into token rows of `target`.

    source and target are [rows, ...] of this rank; transfers between ranks are one batch of
    isend/irecv (tags keep several transfers between two ranks apart). Returns the bytes
    this rank sent.
    """
    rank = group.rank()
    ops, received, sent = [], [], 0
    for tag, t in enumerate(plan):
        (src, src_start), (dst, dst_start) = (t.src, t.src_start), (t.dst, t.dst_start)
        if reverse:
            (src, src_start), (dst, dst_start) = (dst, dst_start), (src, src_start)
        src_rows = slice(src_start, src_start + t.length)
        dst_rows = slice(dst_start, dst_start + t.length)
        if src == rank and dst == rank:
            received.append((dst_rows, source[src_rows]))
        elif src == rank:
            payload = source[src_rows].contiguous()
            peer = dist.get_global_rank(group, dst)
            ops.append(dist.P2POp(dist.isend, payload, peer, group, tag))
            sent += payload.numel() * payload.element_size()
        elif dst == rank:
            buffer = torch.empty_like(target[dst_rows])
            peer = dist.get_global_rank(group, src)
            ops.append(dist.P2POp(dist.irecv, buffer, peer, group, tag))
            received.append((dst_rows, buffer))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    for rows, values in received:
        if reverse:
            target[rows] += values
        else:
            target[rows] = values
    return sent


class _HaloExchange(torch.autograd.Function):
    """x [local tokens, ...] -> halo buffer [sum of halo lengths, ...]."""

    @staticmethod
    def forward(ctx, x, plan, halo_tokens, group, key):
        ctx.plan, ctx.group, ctx.key, ctx.tokens = plan, group, key, x.shape[0]
        halos = x.new_empty(halo_tokens, *x.shape[1:])
        bytes_sent[(*key, "forward")] += _exchange(plan, x, halos, group, reverse=False)
        return halos

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        grad_x = grad.new_zeros(ctx.tokens, *grad.shape[1:])
        bytes_sent[(*ctx.key, "backward")] += _exchange(
            ctx.plan, grad, grad_x, ctx.group, reverse=True
        )
        return grad_x, None, None, None, None


def with_halos(
    x: torch.Tensor,
    layout: ContextParallelLayout,
    halo: int,
    group: dist.ProcessGroup,
    layer_number: int,
) -> torch.Tensor:
    """x [local tokens, ...] -> [halo_0 ; chunk_0 ; halo_1 ; chunk_1 ; ...]: each of this
    rank's chunks preceded by up to `halo` tokens before it in its document, fetched from
    the ranks that hold them (the keys of `layout.window_pieces(halo)`)."""
    lengths = layout.halo_lengths(halo)
    halos = _HaloExchange.apply(
        x, halo_plan(layout, halo), sum(lengths), group, (layer_number, "halo")
    )
    parts, start = [], 0
    for segment, length in zip(layout.segments, lengths, strict=True):
        parts.append(halos[start : start + length])
        parts.append(x[segment.local_start : segment.local_start + segment.length])
        start += length
    return torch.cat(parts)


class _Gathered(torch.autograd.Function):
    """Identity on the already gathered buffer, reordered to global token order; the
    backward reduce-scatters the gradient back to the ranks' own tokens."""

    @staticmethod
    def forward(ctx, x, gathered, order, group, key):
        ctx.order, ctx.group, ctx.key, ctx.dtype = order, group, key, x.dtype
        return gathered.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        size = ctx.group.size()
        grad32 = grad.float()
        rank_major = torch.empty_like(grad32).index_copy_(0, ctx.order, grad32)
        out = grad32.new_empty(grad32.shape[0] // size, *grad32.shape[1:])
        dist.reduce_scatter_tensor(out, rank_major, group=ctx.group)
        bytes_sent[(*ctx.key, "backward")] += (size - 1) * out.numel() * out.element_size()
        return out.to(ctx.dtype), None, None, None, None


class PendingGather:
    """An all-gather in flight; `wait()` returns its result as part of the autograd graph."""

    def __init__(
        self,
        x: torch.Tensor,
        layout: ContextParallelLayout,
        group: dist.ProcessGroup,
        key: tuple[int, str],
    ) -> None:
        self.x, self.layout, self.group, self.key = x, layout, group, key
        self.payload = x.detach().contiguous()  # kept alive until the gather is done
        self.buffer = self.payload.new_empty(group.size() * x.shape[0], *x.shape[1:])
        self.work = dist.all_gather_into_tensor(
            self.buffer, self.payload, group=group, async_op=True
        )
        bytes_sent[(*key, "forward")] += (
            (group.size() - 1) * self.payload.numel() * self.payload.element_size()
        )

    def wait(self) -> torch.Tensor:
        """[global tokens, ...] in global (document) order."""
        self.work.wait()
        order = self.layout.gathered_order(self.x.device)
        return _Gathered.apply(self.x, self.buffer, order, self.group, self.key)


def start_gather(
    x: torch.Tensor,
    layout: ContextParallelLayout,
    group: dist.ProcessGroup,
    layer_number: int,
    what: str,
) -> PendingGather:
    """Start all-gathering x [local tokens, ...] over the CP group (see `PendingGather`)."""
    return PendingGather(x, layout, group, (layer_number, what))
