"""The checkpoint reader takes Megatron's common state from `common.pt` (megatron-core up to
0.17) or from the `common_state` object inside the DCP files (later versions, which write no
`common.pt`)."""

from __future__ import annotations

import argparse
import io
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from megatron_nsa.hf.dist_checkpoint import COMMON_STATE_OBJECT, MegatronCheckpoint


def save_new_style(folder: Path, common: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A torch_dist checkpoint as megatron-core >= 0.18 writes it: the common state pickled
    into one byte object (a list holding the dict) among the tensors."""
    data = io.BytesIO()
    torch.save([common], data)
    data.seek(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save({**tensors, COMMON_STATE_OBJECT: data}, checkpoint_id=str(folder), no_dist=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))


def test_common_state_inside_the_checkpoint(tmp_path):
    common = {"args": argparse.Namespace(num_layers=2, attention_pattern="LG"), "iteration": 7}
    weight = torch.arange(12.0).view(3, 4)
    save_new_style(tmp_path, common, {"decoder.final_layernorm.weight": weight})
    assert not (tmp_path / "common.pt").exists()

    checkpoint = MegatronCheckpoint(tmp_path)
    state = checkpoint.common_state()
    assert state["iteration"] == 7 and state["args"] == common["args"]
    assert checkpoint.tensors() == {"decoder.final_layernorm.weight": (weight.shape, weight.dtype)}
    loaded = checkpoint.load(["decoder.final_layernorm.weight"])
    assert torch.equal(loaded["decoder.final_layernorm.weight"], weight)
    assert COMMON_STATE_OBJECT in checkpoint.common_state_source()
