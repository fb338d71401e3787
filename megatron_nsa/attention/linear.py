"""Linear layers the ASA attention modules build besides Megatron's parallel linears.

- `DuplicatedLinear`: the same weight on every TP rank, as Megatron's MLA down-projections
  (Transformer Engine's `TELinear(parallel_mode="duplicated")`; `TEDuplicatedLinear` below
  builds that one when TE is importable).
- `LatentDownProjection`: GLA's per-latent-head down-projections, split over TP ranks by
  latent head, or replicated when there are more ranks than latent heads.
- `LatentKVUpProjection`: the per-query-head up-projections W_UK / W_UV of a GLA layer,
  applied to raw and compressed latent tokens alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from ..compat import have_transformer_engine
from ..parallel import (
    HeadPartition,
    init_partitioned_,
    mark_partitioned,
    param_device,
    partitioned_sharded_tensor,
    reduce_grad_over_replicas,
    replicate_over_tp,
)
from .fusion import group_kv


class DuplicatedLinear(MegatronModule):
    """y = x W^T (+ b) with W replicated on every TP rank; no communication.

    Under sequence parallelism x holds this rank's tokens only, so the weight gradient is a
    partial sum: the parameters carry `sequence_parallel` and Megatron's
    `finalize_model_grads` sums them over TP, as for Transformer Engine's duplicated linear.
    Returns (output, bias) like Megatron's linears.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method: Callable[[torch.Tensor], None],
        bias: bool,
        skip_bias_add: bool,
    ) -> None:
        super().__init__(config=config)
        device, dtype = param_device(config), config.params_dtype
        self.skip_bias_add = skip_bias_add
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, device=device, dtype=dtype)
        )
        if config.perform_initialization:
            init_partitioned_(self.weight, init_method)
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size, device=device, dtype=dtype))
        for param in self.parameters():
            set_tensor_model_parallel_attributes(param, False, -1, 1)
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None


if have_transformer_engine():
    from megatron.core.extensions.transformer_engine import TELinear

    class TEDuplicatedLinear(TELinear):
        """Transformer Engine's linear in Megatron's "duplicated" mode, with the same
        constructor as `DuplicatedLinear`."""

        def __init__(
            self,
            input_size: int,
            output_size: int,
            *,
            config: TransformerConfig,
            init_method: Callable[[torch.Tensor], None],
            bias: bool,
            skip_bias_add: bool,
        ) -> None:
            super().__init__(
                input_size,
                output_size,
                parallel_mode="duplicated",
                config=config,
                init_method=init_method,
                bias=bias,
                skip_bias_add=skip_bias_add,
                skip_weight_param_allocation=False,
            )

else:
    TEDuplicatedLinear = None


class LatentDownProjection(MegatronModule):
    """c^j = W^j_DKV x for this rank's GLA latent heads j.

    x [s(/TP), b, h] -> [s, b, h_c_local * d_c'].

    With h_c >= TP this is a column-parallel linear split by latent head. With TP > h_c a
    latent head is replicated on TP / h_c ranks: each computes it from the full input, and
    the input gradient is divided by the replica count because every replica returns the
    latent's whole gradient (summed over the replicas downstream, in
    `LatentKVUpProjection`). The weight's checkpoint axis 0 holds all h_c * d_c' rows.
    """

    def __init__(
        self,
        input_size: int,
        latent_dim: int,
        *,
        config: TransformerConfig,
        init_method: Callable[[torch.Tensor], None],
        partition: HeadPartition,
        tp_group: torch.distributed.ProcessGroup,
    ) -> None:
        super().__init__(config=config)
        self.partition, self.tp_group = partition, tp_group
        rows = partition.local_heads * latent_dim
        self.weight = torch.nn.Parameter(
            torch.empty(rows, input_size, device=param_device(config), dtype=config.params_dtype)
        )
        if config.perform_initialization:
            init_partitioned_(self.weight, init_method, partition)
        mark_partitioned(self.weight, partition)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = replicate_over_tp(
            x, self.tp_group, self.config.sequence_parallel, self.partition.replicas
        )
        return F.linear(x, self.weight), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return partitioned_state_dict(self, prefix, sharded_offsets, metadata)


class LatentKVUpProjection(MegatronModule):
    """Per-head keys and values from GLA latent tokens.

    tokens [b, n, h_c_local, d_c' + d_R] ([c^j ; k^R] per latent head j) ->
    k [b, n, H_local, d_h + d_R] = [W_UK_h c^j ; k^R], v [b, n, H_local, d_v] = W_UV_h c^j,
    where query head h reads latent head j = h // (H / h_c). The weight is column-parallel
    over query heads, [H * (d_h + d_v), d_c'] globally (per head: d_h key rows, then d_v
    value rows). This is where a latent replicated on several ranks meets each rank's own
    heads, so the token gradient is summed over the replicas here.
    """

    def __init__(
        self,
        *,
        config: TransformerConfig,
        init_method: Callable[[torch.Tensor], None],
        heads: HeadPartition,
        latents: HeadPartition,
        tp_group: torch.distributed.ProcessGroup,
    ) -> None:
        super().__init__(config=config)
        self.heads, self.latents, self.tp_group = heads, latents, tp_group
        self.key_dim, self.value_dim = config.qk_head_dim, config.v_head_dim
        self.latent_dim = config.global_kv_lora_rank
        rows = heads.local_heads * (self.key_dim + self.value_dim)
        self.weight = torch.nn.Parameter(
            torch.empty(
                rows, self.latent_dim, device=param_device(config), dtype=config.params_dtype
            )
        )
        if config.perform_initialization:
            init_partitioned_(self.weight, init_method, heads)
        mark_partitioned(self.weight, heads)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = reduce_grad_over_replicas(tokens, self.latents, self.tp_group)
        latent, k_rope = tokens.split([self.latent_dim, tokens.shape[-1] - self.latent_dim], -1)
        local_latents = self.latents.local_heads
        group = self.heads.local_heads // local_latents
        weight = self.weight.view(local_latents, group * (self.key_dim + self.value_dim), -1)
        kv = torch.einsum("bnjc,jkc->bnjk", latent, weight)  # [b, n, h_c_local, G * (dk + dv)]
        kv = kv.unflatten(-1, (group, self.key_dim + self.value_dim))
        return group_kv(kv, k_rope, self.key_dim, fuse=self.config.fuse_elementwise)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return partitioned_state_dict(self, prefix, sharded_offsets, metadata, self.heads)


def partitioned_state_dict(
    module: torch.nn.Module,
    prefix: str,
    sharded_offsets: tuple,
    metadata: dict | None,
    partition: HeadPartition | None = None,
) -> dict:
    """Sharded state dict of a module whose parameters all have heads on axis 0."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    partition = partition or module.partition
    return {
        f"{prefix}{name}": partitioned_sharded_tensor(
            param, f"{prefix}{name}", partition, sharded_offsets, metadata["dp_cp_group"]
        )
        for name, param in module.named_parameters(recurse=False)
    }
