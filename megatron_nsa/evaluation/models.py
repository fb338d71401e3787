"""Loading a Hugging Face causal LM for scoring, and what its decode cache costs per token."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..hf import kv_cache

DTYPES = ("float32", "bfloat16", "float16")
ASA_MODEL_TYPE = "asa"


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device={device!r} is not a device (auto, cpu, cuda, cuda:1, ...)"
        ) from None


def load_model(path: str | os.PathLike, *, device: str = "auto", dtype: str | None = None):
    """(model, tokenizer) of a Hugging Face folder, the model in eval mode on `device`.

    `dtype` casts the weights (default: bfloat16 on CUDA, float32 on CPU). Remote code is
    trusted: exported ASA folders carry their modeling files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"model {path}: not a Hugging Face folder (no config.json)")
    target = resolve_device(device)
    dtype = dtype or ("bfloat16" if target.type == "cuda" else "float32")
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=getattr(torch, dtype)
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    return model.to(target).eval(), tokenizer


def kv_bytes_per_token(config, lengths: Sequence[int], value_bytes: int = 2) -> dict[str, dict]:
    """Decode-cache bytes per token after L tokens, per length (bf16 values by default).

    ASA models (any pattern of L, G, D, N layers) are counted as their `ASACache` stores
    them (megatron_nsa.hf.kv_cache); other models as full attention: keys and values of
    every KV head in every layer.
    """
    out = {}
    for length in lengths:
        if getattr(config, "model_type", None) == ASA_MODEL_TYPE:
            total, method = kv_cache.cache_bytes(config, length, value_bytes=value_bytes), "asa"
        else:
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or (
                config.hidden_size // config.num_attention_heads
            )
            total = 2 * config.num_hidden_layers * heads * head_dim * length * value_bytes
            method = "full attention"
        out[str(length)] = {"bytes_per_token": total / length, "method": method}
    return out
