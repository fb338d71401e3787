"""Megatron-LM command-line options for the ASA config fields.

Megatron-LM builds its config with `core_transformer_config_from_args(args, config_class)`,
which copies every argument whose name is a field of the config class. `add_asa_args`
adds one option per ASA field under that name (--attention-pattern -> attention_pattern),
so passing `ASATransformerConfig` as the config class is all the translation needed; see
docs/megatron.md.
"""

from __future__ import annotations

import argparse
import dataclasses

from .config import COMPRESSORS, NSA_BACKENDS, ASATransformerConfig

ASA_FIELDS = (
    "attention_pattern",
    "sliding_window_size",
    "compress_block_size",
    "compress_stride",
    "select_block_size",
    "select_top_n",
    "selection_query_block",
    "global_num_latent_heads",
    "global_kv_lora_rank",
    "compressor",
    "compress_mlp_hidden_size",
    "nsa_backend",
)
"""The fields ASATransformerConfig adds to Megatron's MLATransformerConfig."""

_CHOICES = {"compressor": COMPRESSORS, "nsa_backend": NSA_BACKENDS}


def add_asa_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --attention-pattern, --sliding-window-size, ... (Megatron-LM `extra_args_provider`)."""
    group = parser.add_argument_group("ASA (megatron-nsa)")
    defaults = {field.name: field.default for field in dataclasses.fields(ASATransformerConfig)}
    for name in ASA_FIELDS:
        default = defaults[name]
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=int if default is None else type(default),
            default=default,
            choices=_CHOICES.get(name),
            help=f"ASATransformerConfig.{name} (default: %(default)s)",
        )
    return parser
