"""Context parallelism for the ASA attention layers (see docs/context_parallel.md).

- layout.py: where every token lives under Megatron's load-balanced split (rank r holds
  chunks r and 2P-1-r of every sequence or packed document), the query pieces each layer
  kind runs (`run_pieces`), and which compression blocks each chunk owns.
- comm.py: the exchanges (halos point-to-point, all-gathers whose backward reduce-scatters),
  started asynchronously and finished as autograd functions; `bytes_sent`, the bytes each
  rank sends, and `comm_timer`, an opt-in timer of the exchanges.
"""

from .comm import (
    ByteCounter,
    CommTimer,
    ExchangeCounter,
    PendingGather,
    PendingHalos,
    bytes_sent,
    comm_timer,
    halo_plan,
    start_compressed_gather,
    start_gather,
    start_halos,
    with_halos,
)
from .layout import CompressionPiece, ContextParallelLayout, QueryPiece, Segment, run_pieces

__all__ = [
    "ByteCounter",
    "CommTimer",
    "CompressionPiece",
    "ContextParallelLayout",
    "ExchangeCounter",
    "PendingGather",
    "PendingHalos",
    "QueryPiece",
    "Segment",
    "bytes_sent",
    "comm_timer",
    "halo_plan",
    "run_pieces",
    "start_compressed_gather",
    "start_gather",
    "start_halos",
    "with_halos",
]
