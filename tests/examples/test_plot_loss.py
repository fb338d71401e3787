"""examples/plot_loss.py: a PNG of loss against tokens from pretrain_asa.py logs, a clear error
without matplotlib, and for logs it cannot read."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def plot_loss(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("plot_loss")


def write_log(path: Path, losses: list[float], tokens_per_step: int = 512) -> Path:
    lines = []
    for step, loss in enumerate(losses, 1):
        record = {"step": step, "tokens": step * tokens_per_step, "loss": loss}
        if step % 2 == 0:
            record["eval_loss"] = loss + 0.1
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_steps_in_order_keeping_the_last_of_a_repeated_step(plot_loss, tmp_path):
    log = write_log(tmp_path / "run.jsonl", [3.0, 2.5, 2.0])
    with log.open("a") as file:  # a resumed run logs step 3 again
        file.write(json.dumps({"step": 3, "tokens": 1536, "loss": 1.5}) + "\n")
    xs, losses, evals = plot_loss.read_log(log, "tokens")
    assert xs == [512, 1024, 1536] and losses == [3.0, 2.5, 1.5]
    assert evals == [(1024, 2.6)]
    assert plot_loss.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_writes_a_png_of_two_runs(plot_loss, tmp_path):
    pytest.importorskip("matplotlib")
    logs = [write_log(tmp_path / f"{name}.jsonl", [4.0, 3.0, 2.5, 2.2]) for name in "ab"]
    out = tmp_path / "plots" / "loss.png"
    argv = ["--log-file", str(logs[0]), "--log-file", str(logs[1]), "--out", str(out)]
    assert plot_loss.main([*argv, "--smooth", "2"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in out.parent.iterdir()) == ["loss.png"]


def test_clear_errors(plot_loss, tmp_path, capsys, monkeypatch):
    log = write_log(tmp_path / "run.jsonl", [3.0, 2.0])
    assert plot_loss.main(["--log-file", str(log), "--label", "a", "--label", "b"]) == 2
    assert "--label given 2 times for 1 --log-file" in capsys.readouterr().err
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert plot_loss.main(["--log-file", str(old)]) == 2
    assert "old.jsonl:1: no tokens" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert plot_loss.main(["--log-file", str(log), "--out", str(tmp_path / "x.png")]) == 2
    assert "plot_loss.py needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
