"""Checkpoints that carry their ASA configuration.

A `torch_dist` checkpoint holds tensors only, but converting it (`megatron-nsa export-hf`)
needs the architecture. `save_asa_checkpoint` saves a model with Megatron's
dist_checkpointing and writes, next to the tensors, `asa_config.json` (the architecture
fields of the `ASATransformerConfig` and the GPTModel arguments that shape parameters) and,
when given, the tokenizer folder as `tokenizer/`. Megatron-LM checkpoints need neither file:
Megatron-LM keeps its arguments in `common.pt`, and `record_from_megatron_lm_args` reads
them (train with `megatron_nsa.megatron_lm.add_asa_args`).

The record is plain JSON: {"format", "version", "config": {field: value}, "model": {...}}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core.activations import fast_gelu, quick_gelu, squared_relu
from megatron.core.models.gpt import GPTModel

from .config import ASATransformerConfig
from .megatron_lm import ASA_FIELDS

ASA_CONFIG_FILE = "asa_config.json"
TOKENIZER_DIR = "tokenizer"
RECORD_FORMAT = "megatron-nsa/asa-config"
RECORD_VERSION = 1

CONFIG_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "normalization",
    "layernorm_epsilon",
    "layernorm_zero_centered_gamma",
    "add_bias_linear",
    "gated_linear_unit",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "rope_type",
    "rotary_scaling_factor",
    "softmax_scale",
    "apply_residual_connection_post_layernorm",
    "num_moe_experts",
    "mtp_num_layers",
    "hetereogenous_dist_checkpoint",
    *ASA_FIELDS,
)
"""ASATransformerConfig fields that decide the parameters or the math of a trained model."""

ACTIVATIONS = {
    F.gelu: "gelu",
    fast_gelu: "gelu_tanh",
    F.silu: "silu",
    F.relu: "relu",
    squared_relu: "squared_relu",
    quick_gelu: "quick_gelu",
}


def activation_name(config: ASATransformerConfig) -> str:
    """The MLP activation as the Hugging Face model names it.

    Megatron's fused bias-GELU kernels use the tanh approximation, so a GELU model trained
    with `bias_activation_fusion` is a "gelu_tanh" model.
    """
    if config.use_te_activation_func:
        raise ValueError("use_te_activation_func=True is not supported by the export")
    if config.glu_linear_offset or config.activation_func_clamp_value is not None:
        raise ValueError("glu_linear_offset / activation_func_clamp_value are not supported")
    name = ACTIVATIONS.get(config.activation_func)
    if name is None:
        raise ValueError(
            f"activation_func={config.activation_func!r} has no name the export knows; use one "
            f"of {', '.join(f.__name__ for f in ACTIVATIONS)}"
        )
    return "gelu_tanh" if name == "gelu" and config.bias_activation_fusion else name


def config_record(
    config: ASATransformerConfig,
    *,
    vocab_size: int,
    max_sequence_length: int,
    share_embeddings_and_output_weights: bool,
    position_embedding_type: str,
) -> dict:
    """The JSON record of a model: its config's architecture fields and GPTModel arguments."""
    fields = {name: getattr(config, name) for name in CONFIG_FIELDS}
    fields["activation"] = activation_name(config)
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "config": fields,
        "model": {
            "vocab_size": vocab_size,
            "max_sequence_length": max_sequence_length,
            "share_embeddings_and_output_weights": share_embeddings_and_output_weights,
            "position_embedding_type": position_embedding_type,
        },
        "layout": {
            "tensor_model_parallel_size": config.tensor_model_parallel_size,
            "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
        },
    }


def _gpt_model(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(model, GPTModel):
        if not hasattr(model, "module"):
            raise TypeError(f"expected a GPTModel (possibly wrapped), got {type(model).__name__}")
        model = model.module
    return model


def save_asa_config(directory: str | Path, model: torch.nn.Module) -> Path:
    """Write `asa_config.json` for a GPTModel with ASA layers into `directory`."""
    gpt = _gpt_model(model)
    if not isinstance(gpt.config, ASATransformerConfig):
        raise TypeError("save_asa_config needs a GPTModel built with an ASATransformerConfig")
    record = config_record(
        gpt.config,
        vocab_size=gpt.vocab_size,
        max_sequence_length=gpt.max_sequence_length,
        share_embeddings_and_output_weights=gpt.share_embeddings_and_output_weights,
        position_embedding_type=gpt.position_embedding_type,
    )
    path = Path(directory) / ASA_CONFIG_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _model_state(chunks: list[torch.nn.Module]) -> dict:
    """Megatron-LM's layout: "model", or "model0", "model1", ... per virtual stage."""
    states = [_gpt_model(chunk).sharded_state_dict() for chunk in chunks]
    if len(states) == 1:
        return {"model": states[0]}
    return {f"model{i}": state for i, state in enumerate(states)}


def _as_chunks(model: torch.nn.Module | list[torch.nn.Module]) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def save_asa_checkpoint(
    model: torch.nn.Module | list[torch.nn.Module],
    directory: str | Path,
    *,
    tokenizer: str | Path | None = None,
) -> None:
    """Save `model` (this rank's GPTModel, or its virtual-pipeline chunks) as a `torch_dist`
    checkpoint in the empty folder `directory`, with `asa_config.json` and a copy of the
    `tokenizer` folder. Call it on every rank, as Megatron's dist_checkpointing.save."""
    chunks = _as_chunks(model)
    dist_checkpointing.save(_model_state(chunks), str(directory))
    if torch.distributed.get_rank() == 0:
        save_asa_config(directory, chunks[0])
        if tokenizer is not None:
            shutil.copytree(tokenizer, Path(directory) / TOKENIZER_DIR)
    torch.distributed.barrier()


def load_asa_checkpoint(
    model: torch.nn.Module | list[torch.nn.Module], directory: str | Path
) -> None:
    """Load a checkpoint written by `save_asa_checkpoint`, by `megatron-nsa import-hf` or by
    Megatron-LM (the folder itself, or a Megatron-LM save folder with its tracker file)."""
    directory = Path(directory)
    tracker = directory / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        directory = directory / ("release" if text == "release" else f"iter_{int(text):07d}")
    chunks = _as_chunks(model)
    loaded = dist_checkpointing.load(_model_state(chunks), str(directory))
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    states = [loaded[name] for name in names]
    for chunk, state in zip(chunks, states, strict=True):
        _gpt_model(chunk).load_state_dict(state)


def record_from_megatron_lm_args(args: argparse.Namespace) -> dict | None:
    """The record of a Megatron-LM run from its saved arguments; None when they are not an
    ASA run's (no `attention_pattern`, i.e. trained without `add_asa_args`)."""
    if getattr(args, "attention_pattern", None) is None:
        return None
    fields = {name: getattr(args, name, None) for name in CONFIG_FIELDS}
    fields.update(
        layernorm_epsilon=getattr(args, "norm_epsilon", 1e-5),
        layernorm_zero_centered_gamma=bool(getattr(args, "apply_layernorm_1p", False)),
        num_moe_experts=getattr(args, "num_experts", None),
        num_query_groups=args.num_query_groups if getattr(args, "group_query_attention", False)
        else None,
        rope_type=getattr(args, "rope_type", None) or "rope",
        rotary_scaling_factor=getattr(args, "rotary_scaling_factor", 1.0),
        gated_linear_unit=bool(
            getattr(args, "gated_linear_unit", False)
            or getattr(args, "swiglu", False)
            or getattr(args, "quick_geglu", False)
        ),
    )
    if getattr(args, "activation", None) is not None:  # written by megatron_lm_args
        fields["activation"] = args.activation
    elif getattr(args, "swiglu", False):
        fields["activation"] = "silu"
    elif getattr(args, "quick_geglu", False):
        fields["activation"] = "quick_gelu"
    elif getattr(args, "squared_relu", False):
        fields["activation"] = "squared_relu"
    else:
        fields["activation"] = "gelu_tanh" if getattr(args, "bias_gelu_fusion", False) else "gelu"
    for name in ("rotary_base", "rotary_percent", "normalization", "add_bias_linear"):
        if fields[name] is None:
            fields.pop(name)
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "config": fields,
        "model": {
            "vocab_size": getattr(args, "padded_vocab_size", None),
            "max_sequence_length": getattr(args, "max_position_embeddings", None),
            "share_embeddings_and_output_weights": not getattr(
                args, "untie_embeddings_and_output_weights", False
            ),
            "position_embedding_type": getattr(args, "position_embedding_type", "rope"),
        },
        "layout": {
            "tensor_model_parallel_size": getattr(args, "tensor_model_parallel_size", 1),
            "pipeline_model_parallel_size": getattr(args, "pipeline_model_parallel_size", 1),
        },
    }


def megatron_lm_args(record: dict) -> argparse.Namespace:
    """Megatron-LM arguments for `common.pt` of an imported checkpoint: the layout it was
    written at and the architecture, so Megatron-LM and `record_from_megatron_lm_args` read it."""
    config, model, layout = record["config"], record["model"], record["layout"]
    activation = config["activation"]
    args = {name: config.get(name) for name in CONFIG_FIELDS}
    args.update(
        layout,
        activation=activation,
        norm_epsilon=config["layernorm_epsilon"],
        apply_layernorm_1p=config["layernorm_zero_centered_gamma"],
        num_experts=config["num_moe_experts"],
        group_query_attention=config["num_query_groups"] is not None,
        swiglu=activation == "silu" and config["gated_linear_unit"],
        quick_geglu=activation == "quick_gelu" and config["gated_linear_unit"],
        squared_relu=activation == "squared_relu",
        bias_gelu_fusion=activation == "gelu_tanh",
        padded_vocab_size=model["vocab_size"],
        max_position_embeddings=model["max_sequence_length"],
        untie_embeddings_and_output_weights=not model["share_embeddings_and_output_weights"],
        position_embedding_type=model["position_embedding_type"],
        add_position_embedding=model["position_embedding_type"] == "learned_absolute",
    )
    return argparse.Namespace(**args)


def config_from_record(record: dict, **overrides) -> ASATransformerConfig:
    """An ASATransformerConfig with the record's architecture (and `overrides`, e.g. the
    parallel layout)."""
    fields = dict(record["config"])
    activation = fields.pop("activation")
    functions = {name: fn for fn, name in ACTIVATIONS.items()}
    if activation not in functions:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(functions)}")
    fields["activation_func"] = functions[activation]
    fields.update(overrides)
    return ASATransformerConfig(**fields)
