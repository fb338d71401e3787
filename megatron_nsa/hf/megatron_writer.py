"""Write a Megatron `torch_dist` checkpoint at a TP x PP layout from Hugging Face weights.

One gloo process per rank (CPU only) builds this rank's GPTModel with the ASA layer specs,
copies its shard of every parameter out of the Hugging Face tensors through its own
sharded state dict, and saves with Megatron's dist_checkpointing: the files are exactly
what training at that layout would save. `common.pt` gets Megatron-LM's entries (`args`
with the layout and architecture, `checkpoint_version`, `iteration`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel

from ..checkpoint import config_from_record, megatron_lm_args
from ..specs import get_asa_decoder_block_spec
from .hf_folder import HFWeights, read_hf_config
from .naming import LAYER_PREFIX, Rule, hf_names, layer_rules, model_rules

CHECKPOINT_VERSION = 3.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sharded_tensors(state: dict) -> list[ShardedTensor]:
    """Every ShardedTensor of a sharded state dict, factories built (their tensors are
    views of the parameters, so writing them writes the parameters)."""
    found = []
    for value in state.values():
        if isinstance(value, dict):
            found += _sharded_tensors(value)
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            found += _sharded_tensors(built if isinstance(built, dict) else {"": built})
        elif isinstance(value, list):
            found += _sharded_tensors(dict(enumerate(value)))
        elif isinstance(value, ShardedTensor):
            found.append(value)
    return found


class _Source:
    """Full Megatron tensors computed from the Hugging Face weights, by checkpoint key."""

    def __init__(self, folder: Path) -> None:
        self.config = read_hf_config(folder)
        self.weights = HFWeights(folder)
        self.model = {rule.megatron: rule for rule in model_rules(self.config)}
        self.layers = [
            {rule.megatron: rule for rule in layer_rules(self.config, self.config.layer_kind(i))}
            for i in range(self.config.num_hidden_layers)
        ]

    def fill(self, sharded: ShardedTensor) -> None:
        """Copy this rank's part of the key's tensor into `sharded.data`."""
        key, prepend = sharded.key, sharded.prepend_axis_num
        layer = None
        if key.startswith(LAYER_PREFIX):
            head, _, tail = key[len(LAYER_PREFIX) :].partition(".")
            if head.isdigit():
                layer, name = int(head), tail
            else:  # stacked over layers: axis 0 is the layer
                layer, name = sharded.global_offset[0], key[len(LAYER_PREFIX) :]
            rule = self.layers[layer][name]
        else:
            name, rule = key, self.model[key]
        full = self.tensor(layer, rule)
        region = tuple(
            slice(o, o + n)
            for o, n in zip(sharded.global_offset[prepend:], sharded.local_shape, strict=True)
        )
        with torch.no_grad():
            sharded.data.copy_(full[region])

    def tensor(self, layer: int | None, rule: Rule) -> torch.Tensor:
        return rule.to_megatron([self.weights.get(name) for name in hf_names(layer, rule)])


def _build_model(record: dict, dtype: torch.dtype) -> GPTModel:
    layout = record["layout"]
    config = config_from_record(
        record,
        tensor_model_parallel_size=layout["tensor_model_parallel_size"],
        pipeline_model_parallel_size=layout["pipeline_model_parallel_size"],
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    model = record["model"]
    return GPTModel(
        config,
        get_asa_decoder_block_spec(config, use_transformer_engine=False),
        model["vocab_size"],
        model["max_sequence_length"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model["share_embeddings_and_output_weights"],
        position_embedding_type=model["position_embedding_type"],
    )


def _run_saves_on_cpu() -> None:
    """dist_checkpointing's save synchronizes CUDA and puts its failure flag on the current
    CUDA device; in this worker process (which only saves) both mean the CPU."""
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: torch.device("cpu")


def _worker(rank: int, world: int, port: int, folder: str, out: str, record: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if not torch.cuda.is_available():
        _run_saves_on_cpu()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layout = record["layout"]
        parallel_state.initialize_model_parallel(
            layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
        )
        source = _Source(Path(folder))
        dtype = source.weights.get("model.embed_tokens.weight").dtype
        model = _build_model(record, dtype)
        state = model.sharded_state_dict()
        for sharded in _sharded_tensors(state):
            source.fill(sharded)
        common = {
            "args": megatron_lm_args(record),
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": 0,
        }
        dist_checkpointing.save({"model": state, **common}, out)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def write_megatron_checkpoint(folder: Path, out: Path, record: dict) -> None:
    """Save the Hugging Face weights in `folder` as a torch_dist checkpoint in the existing,
    empty folder `out`, at the layout `record["layout"]` (one CPU process per rank)."""
    layout = record["layout"]
    world = layout["tensor_model_parallel_size"] * layout["pipeline_model_parallel_size"]
    mp.start_processes(
        _worker,
        args=(world, _free_port(), str(folder), str(out), record),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
