"""`megatron-nsa export-hf`: a Megatron `torch_dist` checkpoint -> a Hugging Face folder.

The folder holds config.json (with `auto_map`), configuration_asa.py and modeling_asa.py
(loaded with `trust_remote_code=True`), sharded safetensors with model.safetensors.index.json,
and the tokenizer when the checkpoint has one. The architecture comes from `asa_config.json`
in the checkpoint folder (or the Megatron-LM save folder above it), else from the
Megatron-LM arguments in the checkpoint's common state.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import GenerationConfig

from ..checkpoint import (
    ASA_CONFIG_FILE,
    RECORD_FORMAT,
    RECORD_VERSION,
    TOKENIZER_DIR,
    record_from_megatron_lm_args,
)
from .config_map import hf_config_kwargs
from .configuration_asa import ASAConfig
from .dist_checkpoint import MegatronCheckpoint
from .errors import ConversionError
from .hf_folder import INDEX_FILE
from .modeling_asa import ASAForCausalLM
from .naming import LAYER_PREFIX, Rule, all_rules, hf_names, megatron_name
from .staging import check_output, staged_output

HF_CODE_FILES = (
    "configuration_asa.py", "asa_ops.py", "asa_cache.py", "asa_layers.py", "modeling_asa.py"
)
AUTO_MAP = {
    "AutoConfig": "configuration_asa.ASAConfig",
    "AutoModel": "modeling_asa.ASAModel",
    "AutoModelForCausalLM": "modeling_asa.ASAForCausalLM",
}
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
"""Checkpoint keys of GPTModel parameters (others: optimizer state, RNG, MTP heads)."""

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(size: int | str) -> int:
    """Bytes of "5GB", "500MB", "1000" or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", size.upper())
    if not match:
        raise ConversionError(f"max shard size {size!r} is not a size like 5GB or 500MB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def read_record_file(path: Path) -> dict:
    """An `asa_config.json`, checked for its format."""
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None
    if record.get("format") != RECORD_FORMAT or record.get("version") != RECORD_VERSION:
        raise ConversionError(
            f"{path} is not an ASA config record (format {record.get('format')!r}, version "
            f"{record.get('version')!r}; expected {RECORD_FORMAT!r} version {RECORD_VERSION}); "
            "write it with megatron_nsa.checkpoint.save_asa_config"
        )
    return record


def find_record(checkpoint: MegatronCheckpoint) -> tuple[dict, str]:
    """(record, where it was found) of a checkpoint's ASA configuration."""
    for folder in (checkpoint.directory, checkpoint.root):
        if folder is not None and (folder / ASA_CONFIG_FILE).is_file():
            return read_record_file(folder / ASA_CONFIG_FILE), str(folder / ASA_CONFIG_FILE)
    common = checkpoint.common_state_source()
    args = checkpoint.common_state().get("args")
    if args is not None:
        record = record_from_megatron_lm_args(args)
        if record is None:
            raise ConversionError(
                f"checkpoint {checkpoint.directory} is not an ASA checkpoint: the Megatron-LM "
                f"arguments in {common} have no attention_pattern (train with "
                "megatron_nsa.megatron_lm.add_asa_args)"
            )
        return record, f"{common} (Megatron-LM arguments)"
    raise ConversionError(
        f"checkpoint {checkpoint.directory} has no ASA configuration: no {ASA_CONFIG_FILE} "
        f"there or in its parent, and no Megatron-LM arguments in {common}. Save it with "
        "megatron_nsa.checkpoint.save_asa_checkpoint, or write the file with save_asa_config"
    )


def _source_key(
    checkpoint: MegatronCheckpoint, shapes: dict, layer: int | None, rule: Rule, layers: int
) -> tuple[str, bool]:
    """(checkpoint key holding the rule's tensor, whether it is stacked over layers)."""
    for name in (rule.megatron, *rule.aliases):
        key = megatron_name(layer, name)
        if key in shapes:
            return key, False
        stacked = LAYER_PREFIX + name
        if layer is not None and stacked in shapes and shapes[stacked][0][0] == layers:
            return stacked, True
    raise ConversionError(
        f"checkpoint {checkpoint.directory} has no tensor {megatron_name(layer, rule.megatron)}"
        + ("" if layer is None else f" (layer {layer + 1})")
        + ": the checkpoint is partial, or not an ASA checkpoint of the recorded configuration"
    )


def convert_tensors(
    checkpoint: MegatronCheckpoint, config: ASAConfig, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of a checkpoint (tensors cloned, optionally cast)."""
    shapes = checkpoint.tensors()
    plan = []
    for layer, rule in all_rules(config):
        key, stacked = _source_key(checkpoint, shapes, layer, rule, config.num_hidden_layers)
        plan.append((layer, rule, key, stacked))
    used = {key for *_, key, _ in plan}
    unknown = sorted(k for k in shapes if k.startswith(MODEL_PREFIXES) and k not in used)
    if unknown:
        raise ConversionError(
            f"checkpoint {checkpoint.directory} has parameters the export does not map, e.g. "
            f"{', '.join(unknown[:4])}: its layers are not those of the recorded configuration"
        )
    loaded = checkpoint.load(sorted(used))
    out = {}
    for layer, rule, key, stacked in plan:
        tensor = loaded[key][layer] if stacked else loaded[key]
        for name, part in zip(hf_names(layer, rule), rule.to_hf(tensor), strict=True):
            out[name] = part.to(dtype or part.dtype).contiguous().clone()
    return out


def check_against_model(shapes: dict[str, torch.Size], config: ASAConfig, source: str) -> None:
    """Every parameter of the Hugging Face model is there (`shapes`: name -> shape), with its
    shape, and nothing else."""
    with torch.device("meta"):
        model = ASAForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ConversionError(f"{source}: parameters missing {missing[:4]}, unexpected {extra[:4]}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ConversionError(
                f"{source}: {name} has shape {tuple(shapes[name])}, but its configuration "
                f"gives {tuple(shape)}"
            )


def write_safetensors(
    tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int
) -> None:
    """model-0000i-of-0000n.safetensors shards of at most `max_shard_size` bytes (a larger
    tensor gets a shard of its own) and their index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def find_tokenizer(checkpoint: MegatronCheckpoint, tokenizer: str | Path | None) -> Path | None:
    """The tokenizer folder to ship: the one given, else the checkpoint's `tokenizer/`."""
    if tokenizer is not None:
        if not Path(tokenizer).is_dir():
            raise ConversionError(f"tokenizer folder {tokenizer} does not exist")
        return Path(tokenizer)
    for folder in (checkpoint.directory, checkpoint.root):
        if folder is not None and (folder / TOKENIZER_DIR).is_dir():
            return folder / TOKENIZER_DIR
    return None


def special_token_ids(tokenizer: Path) -> dict[str, int]:
    """bos/eos/pad token ids named by tokenizer_config.json and found in tokenizer.json."""
    config_file, vocab_file = tokenizer / "tokenizer_config.json", tokenizer / "tokenizer.json"
    if not (config_file.is_file() and vocab_file.is_file()):
        return {}
    settings, vocab = json.loads(config_file.read_text()), Tokenizer.from_file(str(vocab_file))
    ids = {}
    for role in ("bos", "eos", "pad"):
        token = settings.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and vocab.token_to_id(token) is not None:
            ids[f"{role}_token_id"] = vocab.token_to_id(token)
    return ids


def export_hf(
    load: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Convert the checkpoint at `load` into a Hugging Face folder `out` (written to a
    temporary sibling and renamed at the end; an existing `out` is replaced only with
    `overwrite`). `dtype`: cast the weights (default: keep the checkpoint's)."""
    check_output(out, overwrite)
    shard_bytes = parse_size(max_shard_size)
    checkpoint = MegatronCheckpoint(load)
    record, source = find_record(checkpoint)
    kwargs = hf_config_kwargs(record, source)
    shapes = checkpoint.tensors()
    embedding = shapes.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ConversionError(
            f"checkpoint {checkpoint.directory} has no embedding.word_embeddings.weight: it is "
            "partial or not a GPT checkpoint"
        )
    kwargs["vocab_size"] = embedding[0][0]
    if "embedding.position_embeddings.weight" in shapes:
        kwargs["max_position_embeddings"] = shapes["embedding.position_embeddings.weight"][0][0]
    tokenizer_dir = find_tokenizer(checkpoint, tokenizer)
    if tokenizer_dir is not None:
        kwargs.update(special_token_ids(tokenizer_dir))
    try:
        config = ASAConfig(**kwargs)
    except ValueError as error:
        raise ConversionError(f"{source}: {error}") from None
    tensors = convert_tensors(checkpoint, config, dtype)
    hf_shapes = {name: tensor.shape for name, tensor in tensors.items()}
    check_against_model(hf_shapes, config, f"checkpoint {checkpoint.directory}")
    config.architectures = ["ASAForCausalLM"]
    config.auto_map = AUTO_MAP
    config.dtype = tensors["model.embed_tokens.weight"].dtype
    with staged_output(out, overwrite) as staging:
        config.save_pretrained(staging)
        ids = {k: v for k, v in kwargs.items() if k.endswith("_token_id")}
        if ids:
            GenerationConfig(**ids).save_pretrained(staging)
        for name in HF_CODE_FILES:
            shutil.copy(Path(__file__).with_name(name), staging / name)
        write_safetensors(tensors, staging, shard_bytes)
        if tokenizer_dir is not None:
            for file in tokenizer_dir.iterdir():
                if file.is_file():
                    shutil.copy(file, staging / file.name)
    return Path(out)
