"""benchmarks/trace_gaps.py on a hand-made Chrome trace: GPU time is charged to the host ops
that launched each kernel, idle gaps to those that launched the next one, syncs and copies to
the ops that made them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trace_gaps  # noqa: E402


def host(name, ts, dur, cat="cpu_op"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 7}


def launch(ts, correlation, name="cudaLaunchKernel", cat="cuda_runtime"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": 2, "pid": 1,
            "tid": 7, "args": {"correlation": correlation}}


def kernel(ts, dur, correlation, cat="kernel", name="k"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 3,
            "args": {"correlation": correlation}}


EVENTS = [
    # host: an autograd function holding a sync, then a second op launching late
    host("SelectedAttentionFunction", 0, 100),
    host("aten::nonzero", 10, 40),
    launch(12, 1),
    launch(20, 2, name="cudaMemcpyAsync"),
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 25, "dur": 20,
     "pid": 1, "tid": 7},
    host("aten::mm", 60, 30),
    launch(70, 3, name="cuLaunchKernelEx", cat="cuda_driver"),
    host("Optimizer.step", 200, 50, cat="user_annotation"),
    launch(210, 4),
    # device: 0-30 busy, copy 30-32, idle 32-80 (waits for launch 3), 80-150 busy,
    # idle 150-215 (waits for launch 4), 215-220 busy
    kernel(14, 16, 1),
    kernel(30, 2, 2, cat="gpu_memcpy", name="Memcpy DtoH (Device -> Pageable)"),
    kernel(80, 70, 3),
    kernel(215, 5, 4),
]


def test_gaps_and_syncs_are_charged_to_their_ops():
    report = trace_gaps.analyse(EVENTS, min_gap_us=5)
    assert report.span == pytest.approx(220 - 14)
    assert report.busy == pytest.approx(16 + 2 + 70 + 5)
    assert dict(report.kernels) == {
        "SelectedAttentionFunction > aten::nonzero": [18.0, 2],
        "SelectedAttentionFunction > aten::mm": [70.0, 1],
        "Optimizer.step": [5.0, 1],
    }
    assert dict(report.gaps) == {
        "SelectedAttentionFunction > aten::mm": [48.0, 1],
        "Optimizer.step": [65.0, 1],
    }
    assert dict(report.syncs) == {
        "cudaStreamSynchronize: SelectedAttentionFunction > aten::nonzero": [20.0, 1],
        "copy to host: SelectedAttentionFunction > aten::nonzero": [2.0, 1],
    }


def test_gaps_under_the_threshold_are_not_counted():
    report = trace_gaps.analyse(EVENTS, min_gap_us=50)
    assert dict(report.gaps) == {"Optimizer.step": [65.0, 1]}


def test_command_line(tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": EVENTS}))
    script = Path(trace_gaps.__file__)
    out = subprocess.run(
        [sys.executable, str(script), str(trace)], capture_output=True, text=True, check=True
    ).stdout
    assert "busy 0.1 ms (45.1%), 2 gaps >= 5 us = 0.1 ms" in out
    assert "Optimizer.step" in out
    assert "0.07 ms      1 kernels  SelectedAttentionFunction > aten::mm" in out


def test_a_trace_without_gpu_events_is_refused():
    with pytest.raises(ValueError, match="no GPU events"):
        trace_gaps.analyse([host("aten::mm", 0, 5)])
