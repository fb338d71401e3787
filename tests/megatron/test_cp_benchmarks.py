"""The context-parallel benchmarks' CPU-checkable parts: argument checks, the scaling report
(table, efficiency, plot), and one short run of each benchmark on two CPU processes (gloo,
reference ops) so their Megatron plumbing, comm timing and result files are exercised
where no GPU is."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cpu_support import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_context_parallel  # noqa: E402
import bench_cp_scaling  # noqa: E402


def record(part: str, name: str, length: int, size: int, ms: float, **extra) -> dict:
    return {"part": part, "name": name, "T": length, "P": size, "ms": ms, "comm_ms": ms / 20,
            "comm_share": 0.05, "peak_gib": 10.0, "mb_sent": 1.0, "status": "ok",
            "preset": "350m", **extra}


def test_report_tables_efficiency_and_plot(tmp_path):
    two, four = tmp_path / "p2.jsonl", tmp_path / "p4.jsonl"
    lines_two = [
        record("step", "LG x24", 2**18, 2, 999.0),  # replaced by the next line
        record("step", "LG x24", 2**18, 2, 1000.0),
        record("layer", "G", 2**20, 2, 400.0),
        {"part": "check", "name": "LG x2", "T": 2**15, "P": 2, "outside_bound": 0},
    ]
    lines_four = [
        record("step", "LG x24", 2**18, 4, 625.0),
        record("layer", "G", 2**20, 4, 250.0),
        {**record("step", "LG x24", 2**20, 4, 0.0), "status": "skipped: --max-seconds"},
    ]
    two.write_text("".join(json.dumps(r) + "\n" for r in lines_two) + "\n")
    four.write_text("".join(json.dumps(r) + "\n" for r in lines_four))
    records = bench_cp_scaling.load_results([str(two), str(four)])
    assert len(records) == 6
    efficiency = bench_cp_scaling.efficiencies(records)
    assert efficiency[("step", "LG x24", 2**18, 2)] == 1.0
    assert efficiency[("step", "LG x24", 2**18, 4)] == pytest.approx(2 * 1000 / (4 * 625))
    assert efficiency[("layer", "G", 2**20, 4)] == pytest.approx(0.8)
    table = bench_cp_scaling.markdown(records)
    assert "| LG x2, bf16 vs CP=1 | 32k | 2 | 0 |" in table
    assert "| global (GLA cmp+slc) | 1M | 4 | 250.0 | 0.80 | 12.5 | 5.0% | 10.0 | 1.00 |" in table
    assert "| step, LG x24 | 256k | 4 | 625.0 | 0.80 | 31.2 | 5.0% | 10.0 | 1.00 |" in table
    assert "| step, LG x24 | 1M | 4 | skipped: --max-seconds | | | | | |" in table
    png = tmp_path / "steps.png"
    bench_cp_scaling.plot(records, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"part": "step"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a result line"):
        bench_cp_scaling.load_results([str(bad)])


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        (bench_context_parallel, ["--lengths", "1001"], r"--lengths 1001: lengths must be"),
        (bench_context_parallel, ["--train-length", "-8"], r"--train-length -8:"),
        (bench_context_parallel, ["--steps", "0"], r"--steps must be at least 1"),
        (bench_context_parallel, ["--max-seconds", "0"], r"--max-seconds must be positive"),
        (bench_cp_scaling, [], r"--results FILE is required"),
        (bench_cp_scaling, ["--results", "r", "--plot", "p.png"], r"go with --report"),
        (bench_cp_scaling, ["--results", "r", "--vocab", "0"], r"--vocab must be at least 1"),
    ],
)
def test_bad_arguments_are_refused(module, argv, message):
    with pytest.raises(SystemExit, match=message):
        module.parse_args(argv)


def test_scaling_lengths_must_split_into_query_blocks():
    args = bench_cp_scaling.parse_args(["--results", "r", "--lengths", "262144", "262152"])
    bench_cp_scaling.check_lengths_for(bench_cp_scaling.parse_args(["--results", "r"]), 8)
    with pytest.raises(SystemExit, match=r"--lengths 262152: .* multiples of 64"):
        bench_cp_scaling.check_lengths_for(args, 8)  # 2 x CP=8 x selection_query_block=4


def run_both(rank: int, world_size: int, folder: str) -> None:
    bench_context_parallel.run(bench_context_parallel.parse_args([
        "--check-length", "0", "--lengths", "256", "--steps", "1", "--train-length", "256",
        "--train-vocab", "256", "--find-max-length", "--max-seconds", "1",
        "--out", f"{folder}/cp2.md",
    ]))
    bench_cp_scaling.run(bench_cp_scaling.parse_args([
        "--results", f"{folder}/scaling.jsonl", "--preset", "tiny", "--lengths", "256",
        "--steps", "1", "--parts", "layers", "step", "--vocab", "256",
    ]))


def test_benchmarks_run_on_two_cpu_processes(tmp_path):
    run_distributed(run_both, 2, str(tmp_path), timeout=600)
    text = (tmp_path / "cp2.md").read_text()
    for label in bench_context_parallel.KINDS.values():
        assert f"| {label} | 256 |" in text
    assert "Longest T trained: 256 tokens; T=512 not tried" in text
    records = bench_cp_scaling.load_results([str(tmp_path / "scaling.jsonl")])
    names = {(r["part"], r["name"]) for r in records}
    assert names == {("layer", "L"), ("layer", "G"), ("layer", "D"), ("step", "LG x4")}
    for r in records:
        assert r["P"] == 2 and r["status"] == "ok" and r["T"] == 256
        assert r["ms"] > 0 and r["comm_ms"] > 0 and r["mb_sent"] > 0
        assert r["comm_share"] == pytest.approx(r["comm_ms"] / r["ms"])
