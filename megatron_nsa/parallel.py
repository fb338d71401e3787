"""Tensor parallelism that Megatron's parallel linears do not cover.

Two cases come up in the ASA layers:

- A tensor computed identically on every TP rank and read by each rank's own heads (the
  shared RoPE key k^R, or a GLA latent head that several ranks share). Its gradient is a
  sum over the ranks that read it; `replicate_over_tp` and `reduce_grad_over_replicas`
  make autograd produce that sum, so gradients are exact right after `backward()`.
- Parameters split by *head* (GLA latent heads, GQA KV heads) rather than by Megatron's
  uniform TP split: with more TP ranks than heads, a head lives on several ranks.
  `HeadPartition` says which heads a rank holds, and `partitioned_sharded_tensor` writes
  them to a checkpoint with the right TP axis and replica ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank


@dataclass(frozen=True)
class HeadPartition:
    """Where `num_heads` heads sit on `tp_size` tensor-parallel ranks.

    With num_heads >= tp_size (num_heads a multiple of tp_size), rank r holds heads
    [r * num_heads / tp_size, (r + 1) * num_heads / tp_size). With tp_size > num_heads
    (tp_size a multiple of num_heads), head j is replicated on the `replicas` =
    tp_size / num_heads consecutive ranks whose query heads read it.
    """

    num_heads: int
    tp_size: int
    tp_rank: int

    def __post_init__(self) -> None:
        if self.num_heads % self.tp_size and self.tp_size % self.num_heads:
            raise ValueError(
                f"{self.num_heads} heads cannot be split over tensor_model_parallel_size="
                f"{self.tp_size}: one must be a multiple of the other"
            )

    @property
    def replicas(self) -> int:
        """TP ranks holding each head (1 unless tp_size > num_heads)."""
        return max(1, self.tp_size // self.num_heads)

    @property
    def local_heads(self) -> int:
        """Heads on this rank."""
        return max(1, self.num_heads // self.tp_size)

    @property
    def shard(self) -> int:
        """Index of this rank's group of heads (ranks holding the same heads share it)."""
        return self.tp_rank // self.replicas

    @property
    def num_shards(self) -> int:
        """Distinct groups of heads over the TP ranks: min(num_heads, tp_size)."""
        return self.tp_size // self.replicas

    @property
    def first_head(self) -> int:
        """Global index of this rank's first head."""
        return self.shard * self.local_heads

    @property
    def replica_rank(self) -> int:
        """Position of this rank among the ranks that hold the same heads."""
        return self.tp_rank % self.replicas


class _ReduceGradOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks that hold the same heads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, partition: HeadPartition, group) -> torch.Tensor:
        ctx.partition, ctx.group = partition, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        partition = ctx.partition
        grad = grad.contiguous()
        if partition.replicas == partition.tp_size:
            torch.distributed.all_reduce(grad, group=ctx.group)
        else:
            # One all-reduce over the TP group with one slot per group of heads: ranks that
            # share heads add into the same slot, so no extra process groups are needed.
            slots = grad.new_zeros((partition.num_shards, *grad.shape))
            slots[partition.shard] = grad
            torch.distributed.all_reduce(slots, group=ctx.group)
            grad = slots[partition.shard]
        return grad, None, None


def reduce_grad_over_replicas(
    x: torch.Tensor, partition: HeadPartition, tp_group: torch.distributed.ProcessGroup
) -> torch.Tensor:
    """Mark the point where heads replicated on several ranks meet each rank's own query heads.

    Upstream of it every replica computes the same values; downstream each rank uses them
    for different query heads. The backward sums the replicas' gradients, so everything
    upstream (down-projection, norm, compressor) gets the exact, identical gradient on all
    replicas and their weights stay equal. A no-op without replication.
    """
    if partition.replicas == 1:
        return x
    return _ReduceGradOverReplicas.apply(x, partition, tp_group)


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the group.

    Megatron's copy_to_tensor_model_parallel_region does the same, but megatron-core 0.16
    silently drops the reduction when the incoming gradient is not contiguous.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def replicate_over_tp(
    x: torch.Tensor,
    tp_group: torch.distributed.ProcessGroup,
    sequence_parallel: bool,
    replicas: int = 1,
) -> torch.Tensor:
    """The full-sequence tensor that every TP rank reads, with its gradient summed over TP.

    x is [s / TP, ...] under sequence parallelism (all-gathered here, reduce-scattered in
    the backward) or [s, ...] replicated (gradient all-reduced in the backward). When each
    rank's gradient is already the exact contribution of a head held by `replicas` ranks
    (see `reduce_grad_over_replicas`), the sum counts it `replicas` times; the gradient is
    divided by `replicas` to count it once.
    """
    if tp_group.size() == 1:
        return x
    if sequence_parallel:
        x = gather_from_sequence_parallel_region(x, group=tp_group)
    else:
        x = _AllReduceGrad.apply(x, tp_group)
    if replicas > 1:
        x = _ScaleGrad.apply(x, 1.0 / replicas)
    return x


@torch.no_grad()
def gather_from_replicas(
    x: torch.Tensor, partition: HeadPartition, tp_group: torch.distributed.ProcessGroup, dim: int
) -> torch.Tensor:
    """Concatenate x along `dim` over the ranks that share this rank's heads, in rank order.

    For values without gradient (block selection): ranks that share a GLA latent head hold
    different query heads of its group, and the group's selection needs all of them.
    """
    pieces = [torch.empty_like(x) for _ in range(partition.tp_size)]
    torch.distributed.all_gather(pieces, x.contiguous(), group=tp_group)
    first = partition.shard * partition.replicas
    return torch.cat(pieces[first : first + partition.replicas], dim=dim)


def param_device(config: TransformerConfig) -> torch.device:
    """Where Megatron allocates parameters: CPU with use_cpu_initialization, else the GPU."""
    if config.use_cpu_initialization:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def init_partitioned_(
    param: torch.Tensor,
    init_method: Callable[[torch.Tensor], None],
    partition: HeadPartition | None = None,
) -> None:
    """Initialize this rank's heads of a parameter whose axis 0 holds heads.

    The tensor of all heads is drawn with the default generator (the same on every TP rank)
    and sliced, so the values do not depend on the TP size and replicas agree. Without a
    partition the parameter is replicated and drawn whole.
    """
    rows = param.shape[0]
    full_rows, first = rows, 0
    if partition is not None:
        per_head = rows // partition.local_heads
        full_rows, first = per_head * partition.num_heads, per_head * partition.first_head
    full = torch.empty((full_rows, *param.shape[1:]), dtype=torch.float32, device=param.device)
    init_method(full)
    with torch.no_grad():
        param.copy_(full[first : first + rows])


def mark_partitioned(param: torch.Tensor, partition: HeadPartition) -> None:
    """Set Megatron's TP attributes so each head is counted once in the gradient norm.

    Megatron counts a parameter on every rank when `tensor_model_parallel` is set and only
    on TP rank 0 otherwise; replicated heads are flagged on their first replica only.
    """
    set_tensor_model_parallel_attributes(param, partition.replica_rank == 0, 0, 1)


def partitioned_sharded_tensor(
    tensor: torch.Tensor,
    key: str,
    partition: HeadPartition,
    prepend_offsets: tuple = (),
    dp_cp_group: torch.distributed.ProcessGroup | None = None,
) -> ShardedTensor:
    """A checkpoint entry for a parameter whose axis 0 holds this rank's heads.

    The global tensor holds all heads in order; replicas of the same heads get distinct
    replica ids so exactly one of them writes.
    """
    dp_rank = get_pg_rank(dp_cp_group) if dp_cp_group is not None else 0
    return ShardedTensor.from_rank_offsets(
        key,
        tensor,
        *prepend_offsets,
        (len(prepend_offsets), partition.shard, partition.num_shards),
        replica_id=(0, partition.replica_rank, dp_rank),
        prepend_axis_num=len(prepend_offsets),
    )
