"""Which Megatron parameter becomes which Hugging Face parameter, and how.

Megatron's checkpoint keys do not depend on the TP/PP layout: a `torch_dist` checkpoint
stores each parameter as its TP=1 tensor under the name Megatron's module tree gives it,
per layer (`decoder.layers.{i}.`, 0-based, when layers differ in kind) or stacked with a
leading layer axis (`decoder.layers.`, when every layer is of one kind). A `Rule` maps one
such tensor to one or more Hugging Face tensors (e.g. Megatron's fused GQA projection to
q/k/v) and back, exactly: only slicing and concatenation, so export and import are
inverse to the bit.

Megatron-side names are those of megatron_nsa's local (non-TE) spec; `aliases` lists the
names Transformer Engine's fused modules give the same tensor (a norm folded into the next
linear as `layer_norm_weight`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .configuration_asa import ASAConfig

LAYER_PREFIX = "decoder.layers."
HF_LAYER_PREFIX = "model.layers."


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor <-> one or more Hugging Face tensors."""

    megatron: str
    hf: tuple[str, ...]
    split: Callable[[torch.Tensor], Sequence[torch.Tensor]] | None = None
    join: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None
    aliases: tuple[str, ...] = ()

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor] if self.split is None else list(self.split(tensor))

    def to_megatron(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if self.join is None else self.join(tensors)


def _halves() -> dict:
    """Megatron's gated MLP fc1 holds [gate ; up] along its rows."""
    return {"split": lambda t: t.chunk(2, dim=0), "join": lambda ts: torch.cat(ts, dim=0)}


def _gqa(config: ASAConfig) -> dict:
    """Megatron's linear_qkv rows, grouped per KV head: [its H/G query heads, key, value]."""
    groups, d = config.num_key_value_heads, config.head_dim
    per_group = config.num_attention_heads // groups

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        grouped = t.view(groups, per_group + 2, d, -1)
        q, k, v = grouped.split([per_group, 1, 1], dim=1)
        return [part.reshape(-1, t.shape[-1]) for part in (q, k, v)]

    def join(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = (part.view(groups, -1, d, part.shape[-1]) for part in ts)
        return torch.cat((q, k, v), dim=1).reshape(-1, q.shape[-1])

    return {"split": split, "join": join}


def _norm(megatron: str, hf: str, layer_norm: bool, aliases: tuple[str, ...] = ()) -> list[Rule]:
    """weight (and bias for LayerNorm); aliases are TE's `<linear>.layer_norm_` prefixes."""
    names = ["weight", "bias"] if layer_norm else ["weight"]
    return [
        Rule(f"{megatron}.{n}", (f"{hf}.{n}",), aliases=tuple(f"{a}{n}" for a in aliases))
        for n in names
    ]


def _linear(megatron: str, hf: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{megatron}.weight", (f"{hf}.weight",))]
    if bias:
        rules.append(Rule(f"{megatron}.bias", (f"{hf}.bias",)))
    return rules


def _query_rules(config: ASAConfig, layer_norm: bool) -> list[Rule]:
    if config.q_lora_rank is None:
        return _linear("self_attention.linear_q_proj", "self_attn.q_proj", False)
    return [
        *_linear("self_attention.linear_q_down_proj", "self_attn.q_a_proj", False),
        *_norm("self_attention.q_layernorm", "self_attn.q_a_layernorm", layer_norm,
               ("self_attention.linear_q_up_proj.layer_norm_",)),
        *_linear("self_attention.linear_q_up_proj", "self_attn.q_b_proj", False),
    ]


def _compressor_rules(megatron: str, hf: str, config: ASAConfig) -> list[Rule]:
    if config.compressor != "mlp":
        return []
    return [Rule(f"{megatron}.{n}", (f"{hf}.{n}",)) for n in ("pos_emb", "w1", "b1", "w2", "b2")]


def attention_rules(config: ASAConfig, kind: str) -> list[Rule]:
    """Rules of one layer's attention (names relative to the layer)."""
    layer_norm = config.normalization == "LayerNorm"
    out = _linear("self_attention.linear_proj", "self_attn.o_proj", config.attention_out_bias)
    if kind == "L":
        return [
            *_query_rules(config, layer_norm),
            *_linear("self_attention.linear_kv_down_proj", "self_attn.kv_a_proj_with_mqa", False),
            *_norm("self_attention.kv_layernorm", "self_attn.kv_a_layernorm", layer_norm,
                   ("self_attention.linear_kv_up_proj.layer_norm_",)),
            *_linear("self_attention.linear_kv_up_proj", "self_attn.kv_b_proj", False),
            *out,
        ]
    if kind == "G":
        return [
            *_query_rules(config, layer_norm),
            *_linear("self_attention.linear_latent_down_proj", "self_attn.kv_a_proj", False),
            Rule("self_attention.latent_layernorm.weight", ("self_attn.kv_a_layernorm.weight",)),
            *_linear("self_attention.linear_kr_proj", "self_attn.kr_proj", False),
            *_linear("self_attention.linear_gate", "self_attn.branch_gate", True),
            Rule("self_attention.core_attention.linear_kv_up_proj.weight",
                 ("self_attn.kv_b_proj.weight",)),
            *_compressor_rules("self_attention.core_attention.compressor", "self_attn.compressor",
                               config),
            *out,
        ]
    qkv = Rule(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        **_gqa(config),
    )
    if kind == "D":
        return [qkv, *out]
    return [
        qkv,
        *_linear("self_attention.linear_gate", "self_attn.branch_gate", True),
        *_compressor_rules("self_attention.core_attention.compress_k", "self_attn.compress_k",
                           config),
        *_compressor_rules("self_attention.core_attention.compress_v", "self_attn.compress_v",
                           config),
        *out,
    ]


def layer_rules(config: ASAConfig, kind: str) -> list[Rule]:
    """Rules of one transformer layer (names relative to `decoder.layers.{i}.` and
    `model.layers.{i}.`)."""
    layer_norm = config.normalization == "LayerNorm"
    if config.gated_mlp:
        fc1 = [Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                    **_halves())]
        if config.mlp_bias:
            fc1.append(Rule("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
                            **_halves()))
    else:
        fc1 = _linear("mlp.linear_fc1", "mlp.up_proj", config.mlp_bias)
    return [
        *_norm("input_layernorm", "input_layernorm", layer_norm),
        *attention_rules(config, kind),
        *_norm("pre_mlp_layernorm", "post_attention_layernorm", layer_norm,
               ("mlp.linear_fc1.layer_norm_",)),
        *fc1,
        *_linear("mlp.linear_fc2", "mlp.down_proj", config.mlp_bias),
    ]


def model_rules(config: ASAConfig) -> list[Rule]:
    """Rules of the parameters outside the layers (full names)."""
    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    if config.position_embedding_type == "learned_absolute":
        rules.append(
            Rule("embedding.position_embeddings.weight", ("model.embed_positions.weight",))
        )
    rules += _norm("decoder.final_layernorm", "model.norm", config.normalization == "LayerNorm")
    if not config.tie_word_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",)))
    return rules


def all_rules(config: ASAConfig) -> list[tuple[int | None, Rule]]:
    """(0-based layer index or None, rule) for every parameter of the model."""
    rules: list[tuple[int | None, Rule]] = [(None, r) for r in model_rules(config)]
    for i in range(config.num_hidden_layers):
        rules += [(i, r) for r in layer_rules(config, config.layer_kind(i))]
    return rules


def hf_names(layer: int | None, rule: Rule) -> list[str]:
    prefix = "" if layer is None else f"{HF_LAYER_PREFIX}{layer}."
    return [prefix + name for name in rule.hf]


def megatron_name(layer: int | None, name: str) -> str:
    """Full per-layer Megatron key of `name` (a rule's name or alias)."""
    return name if layer is None else f"{LAYER_PREFIX}{layer}.{name}"
