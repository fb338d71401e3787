"""Bad input gives a clear error naming the path or field, and never an output folder (nor
a leftover temporary one)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_nsa.cli import main
from megatron_nsa.hf import export as export_module
from megatron_nsa.hf.errors import ConversionError
from megatron_nsa.hf.export import export_hf
from megatron_nsa.hf.import_hf import import_hf


@pytest.fixture
def checkpoint(megatron_runs, tmp_path) -> Path:
    """A copy of the TP=2 case's checkpoint, free to break."""
    return Path(shutil.copytree(megatron_runs / "tp2", tmp_path / "ckpt"))


@pytest.fixture
def hf_folder(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported["tp2"], tmp_path / "hf_copy"))


def assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def edit_record(checkpoint: Path, **fields) -> None:
    path = checkpoint / "asa_config.json"
    record = json.loads(path.read_text())
    record["config"].update(fields)
    path.write_text(json.dumps(record))


def export_fails(load: Path, out: Path, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        export_hf(load, out)
    assert_no_output(out)


def test_missing_checkpoint(tmp_path):
    export_fails(tmp_path / "nowhere", tmp_path / "out", "checkpoint folder .*nowhere does not")


def test_not_a_torch_dist_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    export_fails(tmp_path / "empty", tmp_path / "out", "not a Megatron torch_dist checkpoint")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda c: (c / "__1_0.distcp").unlink(), "partial: __1_0.distcp is missing"),
        (lambda c: (c / "__0_1.distcp").write_bytes(b"x"), "partial: __0_1.distcp has 1 bytes"),
        (lambda c: (c / ".metadata").unlink(), r"partial: \.metadata is missing"),
        (lambda c: (c / "common.pt").unlink(), r"partial: it has neither common\.pt nor"),
    ],
    ids=["missing_shard", "truncated_shard", "no_dcp_metadata", "no_common_state"],
)
def test_partial_checkpoint(checkpoint, tmp_path, damage, match):
    damage(checkpoint)
    export_fails(checkpoint, tmp_path / "out", match)


def test_checkpoint_without_asa_config(checkpoint, tmp_path):
    (checkpoint / "asa_config.json").unlink()
    export_fails(checkpoint, tmp_path / "out", "has no ASA configuration: no asa_config.json")


def test_megatron_lm_checkpoint_of_another_model(checkpoint, tmp_path):
    (checkpoint / "asa_config.json").unlink()
    args = argparse.Namespace(num_layers=4, hidden_size=64, num_attention_heads=4)
    torch.save({"args": args, "iteration": 10}, checkpoint / "common.pt")
    export_fails(checkpoint, tmp_path / "out", "not an ASA checkpoint: .* no attention_pattern")


def test_config_of_other_layers(checkpoint, tmp_path):
    edit_record(checkpoint, attention_pattern="GL")
    export_fails(
        checkpoint, tmp_path / "out",
        r"no tensor decoder\.layers\.0\.self_attention\."
        r"linear_latent_down_proj\.weight \(layer 1\)",
    )


def test_config_of_other_sizes(checkpoint, tmp_path):
    edit_record(checkpoint, kv_lora_rank=8)
    export_fails(checkpoint, tmp_path / "out", r"kv_a_proj_with_mqa\.weight has shape \(40, 64\)")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_moe_experts", 4, "num_moe_experts=4 cannot be exported: MoE"),
        ("rope_type", "yarn", "rope_type='yarn' cannot be exported: .*YaRN"),
        ("normalization", "L2Norm", "normalization='L2Norm' cannot be exported"),
    ],
)
def test_config_the_hf_model_cannot_express(checkpoint, tmp_path, field, value, match):
    edit_record(checkpoint, **{field: value})
    export_fails(checkpoint, tmp_path / "out", match)


def test_existing_output_needs_overwrite(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="out already exists; pass --overwrite"):
        export_hf(checkpoint, out)
    assert (out / "old.txt").read_text() == "keep me"
    export_hf(checkpoint, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_while_writing_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export_module, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_hf(checkpoint, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_megatron_lm_arguments_stand_in_for_the_record(imported, tmp_path):
    """An import-hf checkpoint keeps Megatron-LM arguments in common.pt: enough to export."""
    ckpt = Path(shutil.copytree(imported, tmp_path / "ckpt"))
    (ckpt / "release" / "asa_config.json").unlink()
    config = json.loads((export_hf(ckpt, tmp_path / "again") / "config.json").read_text())
    assert (config["q_lora_rank"], config["hidden_act"], config["gated_mlp"]) == (24, "silu", True)


def import_fails(load: Path, out: Path, match: str, **layout) -> None:
    with pytest.raises(ConversionError, match=match):
        import_hf(load, out, **layout)
    assert_no_output(out)


def test_import_refuses_bad_folders(hf_folder, tmp_path):
    out = tmp_path / "ckpt"
    import_fails(tmp_path / "nowhere", out, "Hugging Face folder .*nowhere does not exist")
    import_fails(hf_folder, out, "num_attention_heads=4 .* tensor_model_parallel_size=3",
                 tensor_parallel_size=3)
    (hf_folder / "model-00001-of-00001.safetensors").unlink()
    import_fails(hf_folder, out, "partial: model-00001-of-00001.safetensors .* is missing")
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    import_fails(hf_folder, out, "model_type is 'llama', not 'asa'")


def test_command_line_reports_errors(checkpoint, tmp_path, capsys):
    (checkpoint / "metadata.json").unlink()
    out = tmp_path / "out"
    assert main(["export-hf", "--load", str(checkpoint), "--out", str(out)]) == 2
    assert "export-hf: error:" in capsys.readouterr().err
    assert_no_output(out)
