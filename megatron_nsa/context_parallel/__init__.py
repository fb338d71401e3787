"""Context parallelism for the ASA attention layers (see docs/context_parallel.md).

- layout.py: where every token lives under Megatron's load-balanced split (rank r holds
  chunks r and 2P-1-r of every sequence or packed document), and the query pieces each
  layer kind runs.
- comm.py: the exchanges (sliding-window halos point-to-point, all-gathers whose backward
  reduce-scatters) as autograd functions, and `bytes_sent`, the bytes each rank sends.
"""

from .comm import ByteCounter, PendingGather, bytes_sent, halo_plan, start_gather, with_halos
from .layout import ContextParallelLayout, QueryPiece, Segment

__all__ = [
    "ByteCounter",
    "ContextParallelLayout",
    "PendingGather",
    "QueryPiece",
    "Segment",
    "bytes_sent",
    "halo_plan",
    "start_gather",
    "with_halos",
]
