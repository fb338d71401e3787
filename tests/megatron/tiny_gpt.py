"""Test support: a tiny ASA GPTModel on CPU and what the tests compare across layouts.

Small dims, T = 96 tokens so that global layers see several compression blocks (l=8, s=4)
and selection blocks (l'=16, n=4 of 6), local layers a window of 16. Models of different
TP/PP layouts are compared through their sharded state dicts: keys and global offsets do
not depend on the layout, so `full_tensors` reassembles full parameters (or gradients) and
`load_full` writes full tensors into any layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_nsa import ASATransformerConfig, get_asa_decoder_block_spec

SEQ, VOCAB, BATCH = 96, 128, 2


def tiny_config(
    tp: int = 1, pp: int = 1, vpp: int | None = None, **overrides
) -> ASATransformerConfig:
    fields = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        attention_pattern="LG",
        sliding_window_size=16,
        compress_block_size=8,
        compress_stride=4,
        select_block_size=16,
        select_top_n=4,
        global_num_latent_heads=2,
        global_kv_lora_rank=16,
        compress_mlp_hidden_size=32,
        nsa_backend="reference",
        hidden_dropout=0.0,
        add_bias_linear=False,
        use_cpu_initialization=True,
        init_method_std=0.05,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    fields.update(overrides)
    return ASATransformerConfig(**fields)


def init_parallel(config: ASATransformerConfig, seed: int = 1234) -> None:
    """(Re)initialize parallel_state for the config's TP/PP/CP layout, then seed."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        config.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        context_parallel_size=config.context_parallel_size,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def build_model(
    config: ASATransformerConfig,
    ddp: DistributedDataParallelConfig | None = None,
    layer_spec: ModuleSpec | None = None,
) -> list[torch.nn.Module]:
    """The model chunks of this rank (one per virtual pipeline stage), optionally in DDP.

    The layers come from `get_asa_decoder_block_spec`, or from one `layer_spec` for all.
    """
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        spec = layer_spec or get_asa_decoder_block_spec(
            config, use_transformer_engine=False, vp_stage=vp_stage
        )
        model = GPTModel(
            config,
            spec,
            VOCAB,
            SEQ,
            pre_process=parallel_state.is_pipeline_first_stage(False, vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(False, vp_stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            vp_stage=vp_stage,
        )
        if config.bf16:
            model = Float16Module(config, model)
        if ddp is not None:
            model = DistributedDataParallel(config, ddp, model)
        chunks.append(model)
    return chunks


def train(
    config: ASATransformerConfig,
    steps: int,
    distributed_optimizer: bool = True,
    weights: dict[str, torch.Tensor] | None = None,
) -> tuple[list[float], list[float]]:
    """Train on one fixed batch with Megatron's DDP and optimizer, from `weights` (full
    tensors) or a fresh init. Returns the mean loss and the gradient norm of every step."""
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
    )
    chunks = build_model(config, ddp)
    if weights is not None:
        load_full(chunks, weights)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.0,
            clip_grad=1.0,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        chunks,
    )
    data, losses, norms = batch(), [], []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = last_stage_output(forward_backward(chunks, data))
        _, grad_norm, _ = optimizer.step()
        losses.append(loss.float().mean().item())
        norms.append(grad_norm)
    return losses, norms


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch: next-token targets over random tokens with some repetition."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB // 4, (BATCH, SEQ + 1), generator=generator)
    tokens[:, SEQ // 2 :] = tokens[:, : SEQ // 2 + 1]  # a copy task for the second half
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).expand(BATCH, -1),
    }


def forward_backward(
    chunks: list[torch.nn.Module],
    data: dict[str, torch.Tensor],
    forward_only: bool = False,
    num_microbatches: int = 1,
    packed_seq_params=None,
) -> torch.Tensor | None:
    """One step of Megatron's pipeline schedule over `num_microbatches` slices of the batch.

    Returns, on the last pipeline stage, the per-token loss [b, s] (or the gathered logits
    [b, s, vocab] when `data` has no labels); None elsewhere. Gradients are finalized as in
    Megatron's training loop.
    """
    outputs = []

    def loss_func(output: torch.Tensor):
        # (sum, tokens, report): Megatron divides by this rank's tokens, so under context
        # parallelism each rank's share is its own mean and the gradients' average over
        # the CP group is the gradient of the mean over the whole sequence.
        outputs.append(output.detach())
        loss = output.float()
        return loss.sum(), torch.tensor(loss.numel()), {"loss": loss.mean().detach()}

    def step(data_iterator, model):
        item = next(data_iterator)
        output = model(
            item["tokens"],
            item["position_ids"],
            None,
            labels=item.get("labels"),
            packed_seq_params=packed_seq_params,
            runtime_gather_output="labels" not in item,
        )
        return output, loss_func

    for chunk in chunks:
        if hasattr(chunk, "zero_grad_buffer"):
            chunk.zero_grad_buffer()
    micro = [
        {key: value.chunk(num_microbatches)[i] for key, value in data.items()}
        for i in range(num_microbatches)
    ]
    iterators = [iter(micro) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=data["tokens"].shape[1],
        micro_batch_size=data["tokens"].shape[0] // num_microbatches,
        forward_only=forward_only,
    )
    if not forward_only and hasattr(chunks[0], "ddp_config"):
        finalize_model_grads(chunks)
    return torch.cat(outputs) if outputs else None


def last_stage_output(output: torch.Tensor | None) -> torch.Tensor:
    """The last pipeline stage's output, on every rank."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, output)
    return next(item for item in gathered if item is not None)


def _sharded_tensors(chunks: list[torch.nn.Module]) -> list[ShardedTensor]:
    found = []

    def visit(value):
        if isinstance(value, ShardedTensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for chunk in chunks:
        visit(unwrap(chunk).sharded_state_dict())
    return found


def unwrap(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, GPTModel):
        chunk = chunk.module
    return chunk


def _grad(param: torch.Tensor) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def _region(sharded: ShardedTensor) -> tuple[slice, ...]:
    """Where a shard sits in its full tensor; the axes Megatron prepends (the layer axis of
    stacked layers) hold one index each."""
    shape = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
    return tuple(slice(o, o + n) for o, n in zip(sharded.global_offset, shape, strict=True))


def full_tensors(
    chunks: list[torch.nn.Module], of: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Full tensors keyed by checkpoint key, assembled from every rank's shards.

    `of` maps a parameter to what to collect (default: the parameter, e.g. `grads` for
    its gradient). Replicated shards must agree; that is checked here.
    """
    mine = []
    for sharded in _sharded_tensors(chunks):
        value = sharded.data if of is None else of(sharded.data)
        region = _region(sharded)
        local = value.detach().float().reshape([r.stop - r.start for r in region]).clone()
        mine.append((sharded.key, sharded.global_shape, region, local))
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    full: dict[str, torch.Tensor] = {}
    for key, shape, region, local in (entry for rank in gathered for entry in rank):
        tensor = full.setdefault(key, torch.full(shape, float("nan")))
        if not torch.isnan(tensor[region]).all():
            torch.testing.assert_close(
                tensor[region], local, msg=lambda m, key=key: f"replicas of {key} differ: {m}"
            )
        tensor[region] = local
    return full


def grads(param: torch.Tensor) -> torch.Tensor:
    return _grad(param)


def load_full(chunks: list[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards out of full tensors (as `full_tensors` returns them)."""
    with torch.no_grad():
        for sharded in _sharded_tensors(chunks):
            sharded.data.copy_(full[sharded.key][_region(sharded)].reshape(sharded.data.shape))


def assert_close_dicts(actual: dict, expected: dict, atol: float, rtol: float = 1e-4) -> None:
    assert actual.keys() == expected.keys(), set(actual) ^ set(expected)
    for key in expected:
        torch.testing.assert_close(
            actual[key], expected[key], atol=atol, rtol=rtol, msg=lambda m, key=key: f"{key}: {m}"
        )


def compare_with_one_rank(overrides: dict, tp: int = 1, pp: int = 1, **parallel) -> None:
    """Per-token loss and full gradients of a (tp, pp, parallel) layout equal TP=1's."""
    data = batch()
    reference = tiny_config(**overrides)
    init_parallel(reference)
    chunks = build_model(reference, DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    weights = full_tensors(chunks)
    expected_loss = forward_backward(chunks, data, num_microbatches=2)
    expected_grads = full_tensors(chunks, grads)

    config = tiny_config(tp=tp, pp=pp, **parallel, **overrides)
    init_parallel(config)
    chunks = build_model(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    load_full(chunks, weights)
    loss = last_stage_output(forward_backward(chunks, data, num_microbatches=2))
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert_close_dicts(full_tensors(chunks, grads), expected_grads, atol=1e-5)
