"""examples/replicate_quality.py --tiny end to end on CPU (four patterns trained on the same
tokens, exported, scored), the same scores again through `megatron-nsa evaluate`, and
examples/plot_quality.py on its results."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_nsa.cli import main as cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "2"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "replicate_quality.py"), "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=400, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "wrote" in result.stdout, result.stdout
    return out


def test_four_models_train_on_the_same_tokens_and_are_scored(run):
    results = json.loads((run / "results.json").read_text())
    models = results["models"]
    assert list(models) == ["LG", "N", "D", "G"]
    assert len({json.dumps(m["train"]["tokens"]) for m in models.values()}) == 1
    for name, model in models.items():
        log = [json.loads(line) for line in (run / model["train"]["log"]).read_text().splitlines()]
        assert len(log) == model["train"]["iterations"] == 2
        assert math.isfinite(model["train"]["final_loss"])
        assert set(model["heldout_loss"]) == {"96", "128"}
        assert all(0 < v["loss"] < math.inf for v in model["heldout_loss"].values())
        assert len(model["passkey"]["cells"]) == 4 and len(model["passkey"]["results"]) == 4
        assert model["kv_cache"]["128"]["method"] == "asa"
        assert (run / "logs" / f"{name}.txt").read_text().startswith("ASA tiny pattern=" + name)
    kv = {name: m["kv_cache"]["128"]["bytes_per_token"] for name, m in models.items()}
    assert kv["LG"] < kv["N"] and kv["LG"] < kv["D"]
    assert results["setup"]["data"]["passkey_documents"] > 0
    calibration = results["calibration"]
    assert set(calibration["step_seconds"]) == {"N", "G"} and calibration["iterations"] == 2
    for name in ("N", "G"):
        assert len((run / "logs" / f"calibration_{name}.jsonl").read_text().splitlines()) == 2
    assert results["setup"]["data"]["heldout_packages"] == ["tomllib"]


def test_the_command_line_repeats_the_scores(run, tmp_path):
    out = tmp_path / "lg.json"
    args = ["evaluate", "--model", str(run / "work" / "hf_LG"), "--heldout",
            str(run / "work" / "data"), "--out", str(out), "--lengths", "96,128", "--depths",
            "0,1", "--samples", "1", "--loss-tokens", "256", "--batch-tokens", "256",
            "--device", "cpu"]
    assert cli(args) == 0
    again = json.loads(out.read_text())
    first = json.loads((run / "results.json").read_text())["models"]["LG"]
    for length, value in first["heldout_loss"].items():
        assert math.isclose(again["heldout_loss"][length]["loss"], value["loss"], rel_tol=1e-6)
    assert again["passkey"]["results"] == first["passkey"]["results"]
    assert cli(["evaluate", "--model", str(tmp_path), "--heldout", str(tmp_path), "--out",
                str(out)]) == 2


def test_plots_and_table(run, tmp_path, capsys):
    plot = load_example("plot_quality")
    code = plot.main([str(run), "--out", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| LG |") == 3  # the summary row and one row per depth
    assert "| LG | 0 | 0/1 | 0/1 |" in table and "% of N)" in table
    if importlib.util.find_spec("matplotlib") is None:
        assert code == 2 and "need matplotlib" in capsys.readouterr().err
    else:
        assert code == 0
        for name in ("loss_curves.png", "passkey_heatmap.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_sets_the_steps_of_the_slowest_pattern():
    replicate = load_example("replicate_quality")
    log = [{"tokens_per_s": 1000.0}, {"tokens_per_s": 4000.0}, {"tokens_per_s": 2000.0},
           {"tokens_per_s": 4000.0}]
    assert replicate.step_seconds(log, 4000) == 1.0  # median of 1, 2, 1; the first is left out
    assert replicate.calibrated_iters({"N": 0.5, "G": 0.8}, 100.0, 5000) == 125
    assert replicate.calibrated_iters({"N": 0.5}, 100.0, 50) == 50
    assert replicate.calibrated_iters({"N": 500.0}, 100.0, 50) == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--patterns", "LG,LX"], "'LX' is not a string over L, G, D, N"),
        (["--patterns", "LG,LG"], "names a pattern twice"),
        (["--depths", "0,2"], "depths=[0.0, 2.0] must be numbers in [0, 1]"),
        (["--global-batch-size", "3"], "multiple of --micro-batch-size 2"),
    ],
)
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    replicate = load_example("replicate_quality")
    assert replicate.main(["--tiny", "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
