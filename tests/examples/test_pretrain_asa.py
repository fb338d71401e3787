"""examples/pretrain_asa.py on CPU (one gloo process, fp32): the tiny preset learns on mock
data, a resumed run repeats the straight run's losses exactly, --export-hf writes a Hugging
Face model with Megatron's loss (the same folder as `megatron-nsa export-hf` on the save
folder), and bad input fails with one clear line before any process group is made."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "pretrain_asa.py"
STEPS = 6
EVAL_ITERS = 2


def pretrain(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def losses(log_file: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log_file.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, list[float]]:
    """STEPS steps of the tiny preset on mock data, saving halfway and at the end, exported."""
    tmp = tmp_path_factory.mktemp("straight")
    log = tmp / "metrics.jsonl"
    result = pretrain(
        "--preset", "tiny", "--mock-data", "--train-iters", STEPS, "--save", tmp / "ckpt",
        "--save-interval", STEPS // 2, "--eval-interval", STEPS // 2, "--log-file", log,
        "--eval-iters", EVAL_ITERS, "--export-hf", tmp / "hf",
        "--profile-dir", tmp / "profile", "--profile-steps", 2, 3,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "TFLOP/s/GPU" in result.stdout and "eval loss" in result.stdout, result.stdout
    return tmp / "ckpt", losses(log)


def test_tiny_preset_learns(straight_run):
    _, straight = straight_run
    assert len(straight) == STEPS
    assert straight[-1] < 0.95 * straight[0], straight


def test_profile_of_the_chosen_steps(straight_run):
    """The straight run profiled steps 2-3: a Chrome trace and the ops table, nothing partial."""
    folder = straight_run[0].parent / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["ops_rank0.txt", "trace_rank0.json"]
    table = (folder / "ops_rank0.txt").read_text()
    assert table.startswith("# steps 2-3, rank 0") and "aten::mm" in table
    events = json.loads((folder / "trace_rank0.json").read_text())["traceEvents"]
    assert any(event.get("name") == "aten::mm" for event in events)


def test_resume_repeats_the_straight_run(straight_run, tmp_path):
    checkpoint, straight = straight_run
    half = checkpoint / f"iter_{STEPS // 2:07d}"
    assert (half / "asa_config.json").exists() and (checkpoint / "iter_0000006").exists()
    log = tmp_path / "metrics.jsonl"
    result = pretrain(
        "--preset", "tiny", "--mock-data", "--train-iters", STEPS, "--load", half,
        "--log-file", log, "--profile-dir", tmp_path / "profile", "--profile-steps", 2, 4,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert losses(log) == straight[STEPS // 2 :]
    # Steps 2-4 are counted over the whole training: the resumed run profiles step 4.
    table = (tmp_path / "profile" / "ops_rank0.txt").read_text()
    assert table.startswith("# steps 4-4, rank 0")


def test_refuses_a_checkpoint_of_another_config(straight_run):
    checkpoint, _ = straight_run
    result = pretrain(
        "--preset", "tiny", "--pattern", "G", "--mock-data", "--train-iters", STEPS,
        "--load", checkpoint,
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert "another configuration" in result.stderr
    assert "attention_pattern: saved 'LG', now 'G'" in result.stderr
    assert "step 1/" not in result.stdout


def test_refuses_a_data_folder_without_text(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    result = pretrain("--preset", "tiny", "--data", tmp_path, "--train-iters", 2)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "no prepared dataset" in result.stderr
    assert "step 1/" not in result.stdout


def test_refuses_a_sequence_length_cp_cannot_split():
    result = pretrain("--preset", "tiny", "--mock-data", "--seq-length", "255")
    assert result.returncode == 2, result.stderr[-4000:]
    assert "must be divisible by 2 x context-parallel size" in result.stderr


def test_export_hf_gives_megatrons_loss(straight_run):
    """The evaluation at the last step ran on the weights the final checkpoint holds: the
    exported model must give the same loss on the same validation samples."""
    from transformers import AutoModelForCausalLM

    from megatron_nsa.data import MockTokenizer, build_gpt_datasets

    checkpoint, _ = straight_run
    records = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").open()]
    assert records[-1]["step"] == STEPS and records[-1]["tokens"] == STEPS * 512
    _, valid = build_gpt_datasets(
        None, MockTokenizer(1024), 512, train_samples=STEPS, valid_samples=EVAL_ITERS, seed=1234
    )
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint.parent / "hf", trust_remote_code=True
    ).eval()
    losses_ = []
    for i in range(EVAL_ITERS):
        sample = valid[i]
        with torch.no_grad():
            logits = model(torch.as_tensor(sample["tokens"])[None], use_cache=False).logits[0]
        per_token = torch.nn.functional.cross_entropy(
            logits.float(), torch.as_tensor(sample["labels"]), reduction="none"
        )
        mask = torch.as_tensor(sample["loss_mask"]).float()
        losses_.append(float((per_token * mask).sum() / mask.sum()))
    assert sum(losses_) / EVAL_ITERS == pytest.approx(records[-1]["eval_loss"], abs=2e-4)


def test_export_hf_equals_the_command_on_the_save_folder(straight_run, tmp_path):
    """asa_config.json is the record `megatron-nsa export-hf` reads: converting the --save
    folder (its latest checkpoint) gives the folder --export-hf wrote."""
    from safetensors.torch import load_file

    from megatron_nsa.cli import main as cli

    checkpoint, _ = straight_run
    assert cli(["export-hf", "--load", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    for folder in (checkpoint.parent / "hf", tmp_path / "hf"):
        assert (folder / "config.json").is_file()
    ours = load_file(checkpoint.parent / "hf" / "model-00001-of-00001.safetensors")
    theirs = load_file(tmp_path / "hf" / "model-00001-of-00001.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ----------------------------------------------------------------------------- bad input,
# in this process: each must be refused before init_distributed, which here fails the test.


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    module = importlib.import_module("pretrain_asa")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    def started(args):
        raise AssertionError("bad input reached init_distributed")

    monkeypatch.setattr(module, "init_distributed", started)
    return module


def refused(script, capsys, *argv: str | Path) -> str:
    assert script.main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (("--seq-length", "514", "--context-parallel-size", "2"), "2",
         "--seq-length 514 must be divisible by 2 x context-parallel size = 4"),
        (("--preset", "350m", "--seq-length", "8200", "--context-parallel-size", "2"), "2",
         "--seq-length 8200 must be divisible by 16: the CP chunks must hold whole query blocks"),
        (("--context-parallel-size", "2",), "1", "cannot be split into TP x PP x CP = 1 x 1 x 2"),
        (("--profile-dir", "prof", "--train-iters", "4", "--profile-steps", "3", "5"), "1",
         "--profile-steps 3 5 must satisfy 1 <= FIRST <= LAST <= --train-iters 4"),
        (("--sequence-parallel", "--tensor-model-parallel-size", "4", "--seq-length", "258"),
         "4", "--sequence-parallel splits each rank's 258 tokens over TP=4 ranks"),
        (("--recompute", "full", "--recompute-modules", "mlp"), "1",
         "--recompute-modules mlp needs --recompute selective (got --recompute full)"),
        (("--tensor-model-parallel-size", "3",), "3",
         "num_attention_heads=4 is invalid: must be a multiple of tensor_model_parallel_size=3"),
    ],
)
def test_refuses_lengths_and_layouts(script, capsys, monkeypatch, argv, world, message):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", world)
    assert message in refused(script, capsys, "--mock-data", *argv)


def test_refuses_text_that_is_not_prepared(script, capsys, tmp_path):
    (tmp_path / "mine.py").write_text("print('hello')\n")
    error = refused(script, capsys, "--data", tmp_path)
    assert "no prepared dataset" in error and "python -m megatron_nsa.data.prepare" in error
    assert "no such folder" in refused(script, capsys, "--data", tmp_path / "missing")


def test_refuses_export_without_save_or_onto_a_folder(script, capsys, tmp_path):
    error = refused(script, capsys, "--mock-data", "--export-hf", tmp_path / "hf")
    assert "--export-hf needs --save" in error
    error = refused(
        script, capsys, "--mock-data", "--save", tmp_path / "ckpt", "--export-hf", tmp_path
    )
    assert f"--export-hf {tmp_path} already exists" in error


def test_refuses_another_config_before_starting(script, capsys, straight_run, tmp_path):
    checkpoint, _ = straight_run
    error = refused(script, capsys, "--mock-data", "--load", checkpoint, "--seq-length", "256")
    assert "another configuration" in error and "seq_length: saved 512, now 256" in error
    error = refused(script, capsys, "--mock-data", "--load", checkpoint, "--preset", "350m")
    assert "hidden_size: saved 128, now 1024" in error
    assert "no checkpoint there" in refused(script, capsys, "--mock-data", "--load", tmp_path)
