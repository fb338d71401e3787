"""The kernel benchmarks' traffic and roofline arithmetic (benchmarks/common.py), on CPU."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


def test_compulsory_bytes_of_forward_and_backward():
    q = torch.zeros(1, 10, 2, 8, dtype=torch.bfloat16)  # 320 bytes
    k = v = torch.zeros(1, 10, 1, 8, dtype=torch.bfloat16)  # 160 bytes each
    o = torch.zeros(1, 10, 2, 8, dtype=torch.bfloat16)  # 320 bytes
    index = torch.zeros(1, 10, 1, 4, dtype=torch.int32)  # 160 bytes
    assert common.compulsory_bytes([q, k, v], [o], backward=False) == 960
    assert common.compulsory_bytes([q, k, v], [o], backward=False, index=[index]) == 1120
    # + inputs read again and their gradients written, o and dO read, the index read again
    assert common.compulsory_bytes([q, k, v], [o], backward=True, index=[index]) == (
        1120 + 2 * 640 + 2 * 320 + 160
    )


@pytest.mark.parametrize(
    "flops, traffic, ms, share",
    [
        (989e12, 3.35e12, 1000.0, 100.0),  # both at peak for one second
        (989e9, 0, 2.0, 50.0),  # compute-bound: 1 ms of FLOPs in 2 ms
        (0, 3.35e9, 4.0, 25.0),  # memory-bound: 1 ms of traffic in 4 ms
    ],
)
def test_roofline_share(monkeypatch, flops, traffic, ms, share):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    tbps, got = common.roofline(flops, traffic, ms)
    assert got == pytest.approx(share)
    assert tbps == pytest.approx(traffic / ms / 1e9)


def test_roofline_of_an_unknown_gpu_is_nan(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Some GPU")
    assert math.isnan(common.roofline(1e12, 1e9, 1.0)[1])
