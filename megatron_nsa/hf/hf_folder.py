"""Reading an exported Hugging Face folder: its config and its (sharded) safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .configuration_asa import ASAConfig
from .errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def read_hf_config(folder: Path) -> ASAConfig:
    """The ASAConfig of a Hugging Face folder; refuses folders of other models."""
    file = folder / "config.json"
    if not file.is_file():
        raise ConversionError(f"{folder} is not a Hugging Face model folder: no config.json")
    try:
        fields = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{file} is not valid JSON: {error}") from None
    if fields.get("model_type") != ASAConfig.model_type:
        raise ConversionError(
            f"{file}: model_type is {fields.get('model_type')!r}, not {ASAConfig.model_type!r}: "
            "not an ASA model"
        )
    try:
        return ASAConfig.from_dict(fields)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{file}: {error}") from None


class HFWeights:
    """Lazy access to the tensors of a folder's safetensors files, by name."""

    def __init__(self, folder: Path) -> None:
        index, single = folder / INDEX_FILE, folder / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, "pt") as handle:
                weight_map = {name: SINGLE_FILE for name in handle.keys()}
        else:
            raise ConversionError(f"{folder} has no {INDEX_FILE} and no {SINGLE_FILE}")
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise ConversionError(
                    f"{folder} is partial: {file} (named in {INDEX_FILE}) is missing"
                )
        self.folder, self.weight_map = folder, weight_map

    def shapes(self) -> dict[str, torch.Size]:
        out = {}
        for file in sorted(set(self.weight_map.values())):
            with safe_open(self.folder / file, "pt") as handle:
                for name in handle.keys():
                    out[name] = torch.Size(handle.get_slice(name).get_shape())
        return out

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.folder} has no tensor {name}")
        with safe_open(self.folder / self.weight_map[name], "pt") as handle:
            return handle.get_tensor(name)
