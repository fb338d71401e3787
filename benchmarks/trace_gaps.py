"""Where the GPU's time goes and where it waits for the host, from a torch.profiler Chrome
trace (`pretrain_asa.py --profile-dir` writes one per rank).

Prints the GPU's busy time against the traced span, the GPU time ranked by the host ops that
launched the kernels (which op's casts, concatenations or norms cost what), the idle gaps
ranked by the host ops that were launching the kernel each gap waited for, and the
host-device synchronisations (stream/device/event syncs and device-to-host copies) ranked by
the ops that made them.

    python benchmarks/trace_gaps.py prof/trace_rank0.json [--min-gap-us 5] [--depth 3]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "user_annotation", "python_function"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


@dataclass
class HostOps:
    """One thread's host ops as a forest, to find the ops enclosing a moment."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    @staticmethod
    def build(events: list[dict]) -> HostOps:
        ops = HostOps()
        stack: list[int] = []
        for e in sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0))):
            start, end = e["ts"], e["ts"] + e.get("dur", 0)
            while stack and ops.ends[stack[-1]] < end:
                stack.pop()
            ops.starts.append(start)
            ops.ends.append(end)
            ops.names.append(e["name"])
            ops.parents.append(stack[-1] if stack else -1)
            stack.append(len(ops.starts) - 1)
        return ops

    def chain(self, t: float) -> list[str]:
        """The names of the ops running at `t`, outermost first."""
        i = bisect.bisect_right(self.starts, t) - 1
        while i >= 0 and self.ends[i] < t:
            i = self.parents[i]
        names = []
        while i >= 0:
            names.append(self.names[i])
            i = self.parents[i]
        return names[::-1]


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def key_of(chain: list[str], depth: int) -> str:
    """The outermost op that names a module or autograd function, then the innermost ones."""
    if not chain:
        return "(no host op)"
    outer = next((n for n in chain if not n.startswith(("aten::", "cuda"))), chain[0])
    inner = [n for n in chain[-depth:] if n != outer]
    return " > ".join([outer, *inner])


@dataclass
class Report:
    """GPU busy time and span (us), and per key: [microseconds, count]."""

    span: float
    busy: float
    kernels: dict[str, list[float]]
    gaps: dict[str, list[float]]
    syncs: dict[str, list[float]]


def tally(table: dict[str, list[float]], key: str, microseconds: float) -> None:
    entry = table[key]
    entry[0] += microseconds
    entry[1] += 1


def analyse(events: list[dict], min_gap_us: float = 5.0, depth: int = 3) -> Report:
    events = [e for e in events if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        raise ValueError("the trace holds no GPU events (profile on a GPU)")
    launches = {  # Triton and cuBLAS launch through the driver API, the rest the runtime's
        e["args"]["correlation"]: e for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATS:
            by_thread[(e["pid"], e["tid"])].append(e)
    host = {thread: HostOps.build(evs) for thread, evs in by_thread.items()}

    def launched_by(e: dict) -> list[str]:
        launch = launches.get(e.get("args", {}).get("correlation"))
        ops = host.get((launch["pid"], launch["tid"])) if launch else None
        return ops.chain(launch["ts"]) if ops else []

    report = Report(0.0, 0.0, *(defaultdict(lambda: [0.0, 0]) for _ in range(3)))
    end = gpu[0]["ts"]
    for e in gpu:
        start, stop = e["ts"], e["ts"] + e.get("dur", 0)
        key = key_of(launched_by(e), depth)
        tally(report.kernels, key, stop - start)
        if start - end >= min_gap_us:
            tally(report.gaps, key, start - end)
        report.busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    report.span = end - gpu[0]["ts"]

    for e in events:
        if e.get("cat") == "cuda_runtime" and e["name"] in SYNC_CALLS:
            ops = host.get((e["pid"], e["tid"]))
            chain = ops.chain(e["ts"]) if ops else []
            tally(report.syncs, f"{e['name']}: {key_of(chain, depth)}", e.get("dur", 0))
    for e in gpu:
        if e.get("cat") == "gpu_memcpy" and "DtoH" in e["name"]:
            tally(report.syncs, f"copy to host: {key_of(launched_by(e), depth)}", e.get("dur", 0))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-gap-us", type=float, default=5.0)
    parser.add_argument("--depth", type=int, default=3, help="innermost host ops in a key")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    r = analyse(load(args.trace), args.min_gap_us, args.depth)
    idle = sum(total for total, _ in r.gaps.values())
    count = sum(n for _, n in r.gaps.values())
    print(f"{args.trace}: GPU span {r.span / 1e3:.1f} ms, busy {r.busy / 1e3:.1f} ms "
          f"({100 * r.busy / r.span:.1f}%), {count} gaps >= {args.min_gap_us:g} us "
          f"= {idle / 1e3:.1f} ms")
    print(f"\nGPU time, by the host ops launching the kernels (top {args.top}):")
    for key, (total, n) in sorted(r.kernels.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{total / 1e3:9.2f} ms {n:6d} kernels  {key}")
    print(f"\nidle before kernels, by the host ops launching them (top {args.top}):")
    for key, (total, n) in sorted(r.gaps.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{total / 1e3:9.2f} ms {n:6d} gaps  {key}")
    print(f"\nhost waits: sync calls (ms in the call) and copies to host (ms copying), by op "
          f"(top {args.top}):")
    for key, (total, n) in sorted(r.syncs.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{total / 1e3:9.2f} ms {n:6d} calls  {key}")


if __name__ == "__main__":
    main()
