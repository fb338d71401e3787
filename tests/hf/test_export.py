"""Export of Megatron checkpoints saved at TP=2 and PP=2 to Hugging Face: the model loaded with
AutoModelForCausalLM(trust_remote_code=True) gives Megatron's logits; the folder has what the
Hub expects; import back at another layout is exact (export -> import -> export, bit for
bit) and loads in Megatron with the original logits."""

from __future__ import annotations

import ast
import json
import shutil
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from cpu_support import run_distributed
from megatron_runs import CASES, load_and_compare
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_nsa.cli import main
from megatron_nsa.hf.dist_checkpoint import MegatronCheckpoint
from megatron_nsa.hf.export import HF_CODE_FILES, export_hf
from megatron_nsa.hf.hf_folder import INDEX_FILE

ALLOWED_IMPORTS = set(sys.stdlib_module_names) | {"torch", "transformers"}


def load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def weights(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_FILE).read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / file))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_megatron(case, exported, megatron_runs, tokens):
    expected = torch.load(megatron_runs / f"{case}.logits.pt")
    with torch.no_grad():
        logits = load(exported[case])(tokens, use_cache=False).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_folder_is_a_hub_model(exported, tokenizer_dir):
    folder = exported["tp2"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "asa" and config["architectures"] == ["ASAForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_asa.ASAForCausalLM"
    assert (config["pad_token_id"], config["eos_token_id"]) == (0, 1)  # the data pipeline's
    index = json.loads((folder / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(weights(folder))
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert hf_tokenizer.decode(hf_tokenizer("def f(x):").input_ids) == "def f(x):"
    for name in HF_CODE_FILES:  # self-contained: torch, transformers, each other (and
        # nsa_kernels when importable)
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ALLOWED_IMPORTS, (name, node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in ALLOWED_IMPORTS | {"nsa_kernels"}


def test_shards_and_dtype(megatron_runs, tmp_path, tokens):
    folder = export_hf(
        megatron_runs / "dn", tmp_path / "hf_dn_bf16", dtype=torch.bfloat16, max_shard_size="40KB"
    )
    files = set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values())
    assert len(files) > 1 and all((folder / f).is_file() for f in files)
    model = load(folder)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits.float()
    expected = torch.load(megatron_runs / "dn.logits.pt")
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0.05)


def test_export_import_export_is_exact(imported, exported, tmp_path):
    assert main(["export-hf", "--load", str(imported), "--out", str(tmp_path / "again")]) == 0
    first, second = weights(exported["pp2"]), weights(tmp_path / "again")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype
        assert torch.equal(first[name], second[name]), name
    assert (tmp_path / "again" / "tokenizer.json").is_file()


def test_imported_checkpoint_loads_in_megatron(imported, megatron_runs):
    """Saved at TP=2 by import-hf, loaded at PP=2: Megatron's logits of the original run."""
    expected = str(megatron_runs / "pp2.logits.pt")
    run_distributed(load_and_compare, 2, "pp2", str(imported), expected, 1, 2)


def test_transformer_engine_names(megatron_runs, tmp_path, tokens):
    """A checkpoint of the TE backend keeps the pre-MLP norm in the fused linear
    (mlp.linear_fc1.layer_norm_weight): the export reads it there."""
    source = MegatronCheckpoint(megatron_runs / "tp2")
    state = source.load(list(source.tensors()))
    renamed = {
        key.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"): value
        for key, value in state.items()
    }
    assert sum("fc1.layer_norm_weight" in key for key in renamed) == 4
    folder = tmp_path / "te"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(renamed, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    for name in ("metadata.json", "common.pt", "asa_config.json"):
        shutil.copy(source.directory / name, folder / name)
    with torch.no_grad():
        logits = load(export_hf(folder, tmp_path / "hf_te"))(tokens, use_cache=False).logits
    expected = torch.load(megatron_runs / "tp2.logits.pt")
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
