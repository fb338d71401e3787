"""examples/pretrain_asa.py on CPU (one gloo process, fp32): the tiny preset learns on mock
data, a resumed run repeats the straight run's losses exactly, and bad input fails with one
clear line before training starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "pretrain_asa.py"
STEPS = 6


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
    """STEPS steps of the tiny preset on mock data, saving halfway and at the end."""
    tmp = tmp_path_factory.mktemp("straight")
    log = tmp / "metrics.jsonl"
    result = pretrain(
        "--preset", "tiny", "--mock-data", "--train-iters", STEPS, "--save", tmp / "ckpt",
        "--save-interval", STEPS // 2, "--eval-interval", STEPS // 2, "--log-file", log,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "TFLOP/s/GPU" in result.stdout and "eval loss" in result.stdout, result.stdout
    return tmp / "ckpt", losses(log)


def test_tiny_preset_learns(straight_run):
    _, straight = straight_run
    assert len(straight) == STEPS
    assert straight[-1] < 0.95 * straight[0], straight


def test_resume_repeats_the_straight_run(straight_run, tmp_path):
    checkpoint, straight = straight_run
    half = checkpoint / f"iter_{STEPS // 2:07d}"
    assert (half / "asa_config.json").exists() and (checkpoint / "iter_0000006").exists()
    log = tmp_path / "metrics.jsonl"
    result = pretrain(
        "--preset", "tiny", "--mock-data", "--train-iters", STEPS, "--load", half,
        "--log-file", log,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert losses(log) == straight[STEPS // 2 :]


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
