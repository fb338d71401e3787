"""ASA config record (Megatron side, see megatron_nsa.checkpoint) <-> Hugging Face ASAConfig.

The Hugging Face model implements what megatron_nsa's layer specs build: pre-norm layers
with RMSNorm or LayerNorm, a dense MLP, RoPE (or learned absolute positions). Anything
else in a Megatron config is refused here, naming the field, before any file is written.
"""

from __future__ import annotations

from ..checkpoint import RECORD_FORMAT, RECORD_VERSION
from ..megatron_lm import ASA_FIELDS as MEGATRON_ASA_FIELDS
from .configuration_asa import ACTIVATIONS, NORMALIZATIONS, POSITION_EMBEDDINGS, ASAConfig
from .errors import ConversionError

ASA_FIELDS = tuple(field for field in MEGATRON_ASA_FIELDS if field != "nsa_backend")
"""Fields with the same name and meaning on both sides: the ASA fields of the Megatron config
but the kernel backend, which is a run-time choice, not part of the model."""


def _refuse(source: str, field: str, value: object, why: str) -> ConversionError:
    return ConversionError(f"{source}: config.{field}={value!r} cannot be exported: {why}")


def check_expressible(record: dict, source: str) -> None:
    """Raise for settings the Hugging Face model does not implement."""
    config, model = record["config"], record["model"]
    unsupported = {
        "num_moe_experts": (lambda v: v is not None, "MoE MLPs are not implemented"),
        "rope_type": (lambda v: v != "rope", "only plain RoPE is implemented (not YaRN)"),
        "rotary_interleaved": (lambda v: bool(v), "interleaved RoPE is not implemented"),
        "apply_residual_connection_post_layernorm": (
            lambda v: bool(v), "only pre-norm residuals are implemented"
        ),
        "layernorm_zero_centered_gamma": (
            lambda v: bool(v), "zero-centered norm weights are not implemented"
        ),
        "normalization": (lambda v: v not in NORMALIZATIONS, f"allowed: {NORMALIZATIONS}"),
        "activation": (lambda v: v not in ACTIVATIONS, f"allowed: {ACTIVATIONS}"),
    }
    for field, (bad, why) in unsupported.items():
        if bad(config.get(field)):
            raise _refuse(source, field, config.get(field), why)
    position = model.get("position_embedding_type")
    if position not in POSITION_EMBEDDINGS:
        allowed = f"allowed: {POSITION_EMBEDDINGS}"
        raise _refuse(source, "position_embedding_type", position, allowed)


def hf_config_kwargs(record: dict, source: str) -> dict:
    """ASAConfig keyword arguments for a record (its vocab size and position table length
    as recorded; the export replaces them with the checkpoint's tensor shapes)."""
    check_expressible(record, source)
    config, model = record["config"], record["model"]
    heads = config["num_attention_heads"]
    return {
        "vocab_size": model["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["ffn_hidden_size"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_query_groups") or heads,
        "head_dim": config.get("kv_channels") or config["hidden_size"] // heads,
        "q_lora_rank": config.get("q_lora_rank"),
        "kv_lora_rank": config["kv_lora_rank"],
        "qk_nope_head_dim": config["qk_head_dim"],
        "qk_rope_head_dim": config["qk_pos_emb_head_dim"],
        "v_head_dim": config["v_head_dim"],
        **{field: config[field] for field in ASA_FIELDS},
        "hidden_act": config["activation"],
        "gated_mlp": bool(config.get("gated_linear_unit")),
        "mlp_bias": bool(config.get("add_bias_linear")),
        "attention_out_bias": bool(config.get("add_bias_linear")),
        "normalization": config.get("normalization", "RMSNorm"),
        "norm_eps": config.get("layernorm_epsilon", 1e-5),
        "rotary_base": config.get("rotary_base", 10000),
        "rotary_percent": config.get("rotary_percent", 1.0),
        "softmax_scale": config.get("softmax_scale"),
        "position_embedding_type": model["position_embedding_type"],
        "max_position_embeddings": model["max_sequence_length"] or 0,
        "tie_word_embeddings": bool(model["share_embeddings_and_output_weights"]),
    }


def record_from_hf(config: ASAConfig, tensor_parallel_size: int, pipeline_parallel_size: int):
    """The Megatron-side record of a Hugging Face ASAConfig, at a parallel layout."""
    if config.mlp_bias != config.attention_out_bias:
        raise ConversionError(
            f"ASAConfig.mlp_bias={config.mlp_bias} and attention_out_bias="
            f"{config.attention_out_bias} differ; Megatron has one add_bias_linear for both"
        )
    heads = config.num_attention_heads
    dense = bool(set(config.attention_pattern) & set("DN"))
    fields = {
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.intermediate_size,
        "num_attention_heads": heads,
        "num_query_groups": config.num_key_value_heads if config.num_key_value_heads != heads
        else None,
        "kv_channels": config.head_dim if dense else None,
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_head_dim": config.qk_nope_head_dim,
        "qk_pos_emb_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "normalization": config.normalization,
        "layernorm_epsilon": config.norm_eps,
        "layernorm_zero_centered_gamma": False,
        "add_bias_linear": config.mlp_bias,
        "gated_linear_unit": config.gated_mlp,
        "rotary_base": config.rotary_base,
        "rotary_percent": config.rotary_percent,
        "rotary_interleaved": False,
        "rope_type": "rope",
        "rotary_scaling_factor": 1.0,
        "softmax_scale": config.softmax_scale,
        "apply_residual_connection_post_layernorm": False,
        "num_moe_experts": None,
        "mtp_num_layers": None,
        **{field: getattr(config, field) for field in ASA_FIELDS},
        "activation": config.hidden_act,
    }
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "config": fields,
        "model": {
            "vocab_size": config.vocab_size,
            "max_sequence_length": config.max_position_embeddings,
            "share_embeddings_and_output_weights": config.tie_word_embeddings,
            "position_embedding_type": config.position_embedding_type,
        },
        "layout": {
            "tensor_model_parallel_size": tensor_parallel_size,
            "pipeline_model_parallel_size": pipeline_parallel_size,
        },
    }
