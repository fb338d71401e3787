"""The prepare command: its outputs, refusing to overwrite, and no partial output on failure."""

import json
import subprocess
import sys

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_nsa.data import StdlibCorpus, load_tokenizer, prepare_dataset
from megatron_nsa.data import prepare as prepare_module
from megatron_nsa.data.prepare import main


def _args(corpus, out, *extra):
    return ["--corpus", str(corpus), "--out", str(out), "--vocab-size", "300", *extra]


def test_outputs(prepared, packages, vocab_size):
    out, summary = prepared
    assert sorted(p.name for p in out.iterdir()) == [
        "stdlib_text_document.bin",
        "stdlib_text_document.idx",
        "summary.json",
        "tokenizer",
    ]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["documents"] == len(packages) and summary["vocab_size"] == vocab_size
    assert load_tokenizer(out / "tokenizer").eod == summary["eod"]
    assert IndexedDataset(str(out / "stdlib_text_document")).sequence_lengths.sum() > 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_command_line(tmp_path, capsys):
    assert main(_args("stdlib", tmp_path / "out", "--packages", "bisect,colorsys")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["documents"], summary["vocab_size"]) == (2, 300)
    assert "tokenized 2 documents" in capsys.readouterr().out


def test_runs_as_a_module_without_runpy_warning():
    """`python -m megatron_nsa.data.prepare` is the documented command: the package must not
    import the module before runpy executes it (RuntimeWarning, made an error here)."""
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "megatron_nsa.data.prepare",
         "--help"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--corpus" in result.stdout


def test_refuses_a_non_empty_output_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_args("stdlib", out, "--packages", "bisect")) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(_args("stdlib", out, "--packages", "bisect", "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / "summary.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_no_text_fails_before_writing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.bin").write_bytes(b"\x00")
    assert main(_args(empty, tmp_path / "out")) == 2
    assert f"{empty}: no usable text" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failure_midway_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "write_indexed_dataset", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_dataset(
            StdlibCorpus(["bisect"]), out, vocab_size=300, overwrite=True, progress=None
        )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
