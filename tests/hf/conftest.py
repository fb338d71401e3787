"""Shared fixtures: tiny random-init ASA models saved by Megatron-Core on CPU processes at
TP=2 / PP=2 (one spawn for all), their logits, and their Hugging Face exports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "megatron"))

from cpu_support import run_distributed  # noqa: E402
from megatron_runs import CASES, save_cases  # noqa: E402

from megatron_nsa.cli import main  # noqa: E402
from megatron_nsa.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from megatron_nsa.hf.export import export_hf  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer folder, as the data pipeline writes it."""
    texts = ["def f(x):\n    return x + 1\n" * 20, "import os\nprint(os.getcwd())\n" * 20]
    return save_tokenizer(train_tokenizer(texts, vocab_size=300), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def megatron_runs(tmp_path_factory, tokenizer_dir) -> Path:
    """Folder with, per case of megatron_runs.CASES, a checkpoint `<case>/` and the logits
    Megatron computed for `tokens.pt`, in `<case>.logits.pt`."""
    out = tmp_path_factory.mktemp("megatron")
    run_distributed(save_cases, 2, str(out), str(tokenizer_dir), timeout=400)
    return out


@pytest.fixture(scope="session")
def exported(megatron_runs, tmp_path_factory) -> dict[str, Path]:
    """Hugging Face folders of every case (distinct folder names: transformers caches remote
    code per folder name)."""
    root = tmp_path_factory.mktemp("hf")
    return {case: export_hf(megatron_runs / case, root / f"hf_{case}") for case in CASES}


@pytest.fixture(scope="session")
def tokens(megatron_runs) -> torch.Tensor:
    return torch.load(megatron_runs / "tokens.pt")


@pytest.fixture(scope="session")
def imported(exported, tmp_path_factory) -> Path:
    """The PP=2 case, exported, then imported at TP=2 through the command line."""
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    args = ["import-hf", "--load", str(exported["pp2"]), "--out", str(out)]
    assert main([*args, "--tensor-parallel-size", "2", "--pipeline-parallel-size", "1"]) == 0
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on busy shared cores the
    threads' spin-waits make each of their many small ops many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
