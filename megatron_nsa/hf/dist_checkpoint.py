"""Read a Megatron `torch_dist` checkpoint in one process, without a process group or GPU.

A `torch_dist` checkpoint is a torch.distributed.checkpoint (DCP) folder (`.metadata` plus
`__{rank}_{i}.distcp` files) with Megatron's `metadata.json` beside it. Megatron's non-tensor
state is a `common.pt` file next to them (megatron-core up to 0.17) or one serialized object,
`common_state`, inside the DCP files (later versions); both are read. DCP stores every tensor
under its global key and shape, whatever TP/PP layout saved it, so one process can read whole
tensors with DCP's reader in `no_dist` mode.

Accepted paths: the checkpoint folder itself, or a Megatron-LM save folder whose
`latest_checkpointed_iteration.txt` names the iteration (`iter_0000100/` or `release/`).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .errors import ConversionError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MEGATRON_METADATA = "metadata.json"
COMMON_STATE = "common.pt"
COMMON_STATE_OBJECT = "common_state/shard_0_1"
"""DCP key of the common state saved inside the checkpoint: Megatron's ShardedObject
`common_state` of global shape (1,) at offset (0,)."""
DCP_METADATA = ".metadata"


def iteration_folder(root: Path) -> Path:
    """The checkpoint folder a Megatron-LM tracker file points to."""
    text = (root / TRACKER_FILE).read_text().strip()
    if text == "release":
        return root / "release"
    if not text.isdigit():
        raise ConversionError(f"{root / TRACKER_FILE} holds {text!r}, not an iteration number")
    return root / f"iter_{int(text):07d}"


class MegatronCheckpoint:
    """The tensors of a `torch_dist` checkpoint: their keys, shapes and values.

    `directory` is the checkpoint folder; `root` the Megatron-LM save folder above it, if
    any. Construction checks that the checkpoint is complete: Megatron's and DCP's metadata
    and every data file the metadata refers to, at least as long as it says.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_dir():
            raise ConversionError(f"checkpoint folder {path} does not exist")
        self.root: Path | None = None
        if (path / TRACKER_FILE).is_file():
            self.root, path = path, iteration_folder(path)
            if not path.is_dir():
                raise ConversionError(
                    f"{self.root / TRACKER_FILE} points to {path.name}, which does not exist"
                )
        elif (path.parent / TRACKER_FILE).is_file():
            self.root = path.parent
        self.directory = path
        self._check_metadata()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            self._reader = FileSystemReader(str(path))
            self._dcp = self._reader.read_metadata()
        self._check_data_files()
        if not (path / COMMON_STATE).is_file() and not self._has_common_object():
            raise ConversionError(
                f"checkpoint {path} is partial: it has neither {COMMON_STATE} nor a "
                f"'{COMMON_STATE_OBJECT}' entry (was the save interrupted?)"
            )

    def _has_common_object(self) -> bool:
        return COMMON_STATE_OBJECT in self._dcp.state_dict_metadata

    def _check_metadata(self) -> None:
        path = self.directory
        meta = path / MEGATRON_METADATA
        if not meta.is_file():
            raise ConversionError(
                f"{path} is not a Megatron torch_dist checkpoint: it has no {MEGATRON_METADATA} "
                f"(and no {TRACKER_FILE})"
            )
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except json.JSONDecodeError as error:
            raise ConversionError(f"{meta} is not valid JSON: {error}") from None
        if backend != "torch_dist":
            raise ConversionError(
                f"{meta}: sharded_backend is {backend!r}; only 'torch_dist' checkpoints can be "
                "read (re-save with Megatron's torch_dist format)"
            )
        if not (path / DCP_METADATA).is_file():
            raise ConversionError(
                f"checkpoint {path} is partial: {DCP_METADATA} is missing (was the save "
                "interrupted?)"
            )

    def _check_data_files(self) -> None:
        needed: dict[str, int] = {}
        for info in self._dcp.storage_data.values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for name, size in sorted(needed.items()):
            file = self.directory / name
            if not file.is_file():
                raise ConversionError(f"checkpoint {self.directory} is partial: {name} is missing")
            if file.stat().st_size < size:
                raise ConversionError(
                    f"checkpoint {self.directory} is partial: {name} has "
                    f"{file.stat().st_size} bytes, its metadata needs {size}"
                )

    def tensors(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Global shape and dtype of every tensor, by key."""
        return {
            key: (meta.size, meta.properties.dtype)
            for key, meta in self._dcp.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)
        }

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Whole tensors of `keys` (on CPU)."""
        shapes = self.tensors()
        state = {key: torch.empty(shapes[key][0], dtype=shapes[key][1]) for key in keys}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=self._reader, no_dist=True)
        return state

    def common_state_source(self) -> str:
        """Where `common_state` reads from, for messages."""
        if (self.directory / COMMON_STATE).is_file():
            return str(self.directory / COMMON_STATE)
        return f"{self.directory} ('{COMMON_STATE_OBJECT}')"

    def common_state(self) -> dict:
        """Megatron's non-tensor state (Megatron-LM keeps its arguments there), from
        `common.pt` or from the `common_state` object inside the checkpoint."""
        if (self.directory / COMMON_STATE).is_file():
            return torch.load(self.directory / COMMON_STATE, map_location="cpu", weights_only=False)
        state = {COMMON_STATE_OBJECT: io.BytesIO()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=self._reader, no_dist=True)
        data = state[COMMON_STATE_OBJECT]
        data.seek(0)
        return torch.load(data, map_location="cpu", weights_only=False)[0]
