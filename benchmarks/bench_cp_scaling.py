"""Context-parallel scaling: the ~350M preset of examples/pretrain_asa.py at 256k, 512k and
1M tokens with CP = P, for P GPUs of one host; results of runs at different P tabled and
plotted together.

    torchrun --nproc-per-node P benchmarks/bench_cp_scaling.py --results cp_scaling.jsonl \\
        [--lengths 262144 524288 1048576] [--parts check layers step] [--steps 2] \\
        [--step-steps 1] [--max-seconds 480] [--check-length 32768]
    python benchmarks/bench_cp_scaling.py --report cp_scaling.jsonl [more.jsonl ...] \\
        [--markdown FILE.md] [--plot FILE.png]

Under torchrun, in order (`--parts`), each measurement starting only if every rank predicts
that it ends within `--max-seconds` of the start (a length's time predicted from the last
one measured, as (T / T_last)^2 times it):

1. check: bench_context_parallel.py's exactness check at CP=P: a 2-layer "LG" GPTModel in
   bf16 at CP=P against CP=1, every gradient within twice the bf16 error of CP=1 (against
   fp32) plus 1e-3.
2. layers: forward + backward of one local ("L"), global ("G") and dense ("D": SDPA, keys
   and values all-gathered) attention layer of the preset at each length.
3. step: the preset's 24-layer "LG" GPTModel trains one step (forward, backward with full
   activation recompute, Adam; Megatron DDP and distributed optimizer) at each length.

Each measurement reports the median ms of `--steps` layer steps or `--step-steps` training
steps after one warm-up (slower rank), the CP exchanges' time in one more step with
`comm_timer` on (slower rank; the exchanges are then waited for one by one, so this is their
cost without overlap) and its share, the peak GPU memory (largest rank) and the bytes each
rank sent per step; rank 0 appends it to `--results` as one JSON line. `--report` reads such
files (later lines replace earlier ones of the same part, name, T and P), writes the
markdown table with the scaling efficiency (P0 t(P0)) / (P t(P)) against the smallest P
measured for the same row, and plots step time against CP size (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist
from bench_context_parallel import (
    FULL_RECOMPUTE,
    KINDS,
    Budget,
    check,
    check_lengths,
    device_fields,
    device_line,
    length_label,
    out_of_memory,
    release_memory,
    slowest,
    time_layer,
    train_steps,
    write_atomic,
)

from megatron_nsa import ASATransformerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from pretrain_asa import PRESETS  # noqa: E402

PARTS = ("check", "layers", "step")
STEP_PATTERN = "LG"


def preset_config(preset: str, cp: int, pattern: str, **overrides) -> ASATransformerConfig:
    """The preset's architecture as examples/pretrain_asa.py builds it, in bf16."""
    dtype = torch.bfloat16
    fields = dict(
        PRESETS[preset],
        attention_pattern=pattern,
        q_lora_rank=None,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        add_bias_linear=False,
        bf16=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        context_parallel_size=cp,
        **device_fields(),
    )
    return ASATransformerConfig(**{**fields, **overrides})


class Series:
    """Predicts a measurement's seconds from the last one of the same series, T^2-scaled."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, float]] = {}

    def predict(self, name: str, length: int) -> float:
        if name not in self.last:
            return 0.0
        last_length, seconds = self.last[name]
        return seconds * (length / last_length) ** 2

    def record(self, name: str, length: int, seconds: float) -> None:
        self.last[name] = (length, seconds)


def append_result(path: str, record: dict) -> None:
    """Rank 0 appends `record` as one JSON line and prints it."""
    if dist.get_rank() == 0:
        line = json.dumps(record, sort_keys=True)
        write_atomic(path, line + "\n", mode="a")
        print(line, flush=True)


def run(args: argparse.Namespace) -> None:
    """The parts `args` asks for, on every rank of the initialized process group."""
    cp = dist.get_world_size()
    budget, series = Budget(args.max_seconds), Series()
    common = {
        "P": cp,
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    if dist.get_rank() == 0:
        print(device_line(), flush=True)
    if "check" in args.parts and args.check_length:
        rows, failed = check(args.check_length, cp)
        if dist.get_rank() == 0:
            print("\n".join(rows), flush=True)
        append_result(args.results, {**common, "part": "check", "name": "LG x2",
                                     "T": args.check_length, "outside_bound": failed})
    jobs = []
    if "layers" in args.parts:
        jobs += [("layer", kind, length) for kind in args.kinds for length in args.lengths]
    if "step" in args.parts:
        jobs += [("step", f"{STEP_PATTERN} x{PRESETS[args.preset]['num_layers']}", length)
                 for length in args.lengths]
    for part, name, length in jobs:
        record = {**common, "part": part, "name": name, "T": length}
        if not budget.allows(series.predict(f"{part} {name}", length)):
            append_result(args.results, {**record, "status": "skipped: --max-seconds"})
            continue
        if dist.get_rank() == 0:
            print(f"measuring {part} {name} at T={length_label(length)}, CP={cp}", flush=True)
        begin = time.monotonic()
        try:
            if part == "layer":
                config = preset_config(args.preset, cp, name, num_layers=1)
                result = time_layer(config, name, length, args.steps, warmup=1)
            else:
                config = preset_config(args.preset, cp, STEP_PATTERN, **FULL_RECOMPUTE)
                result = train_steps(config, length, args.vocab, args.step_steps)
        except torch.cuda.OutOfMemoryError:
            out_of_memory(f"{part} {name} at T={length_label(length)}, CP={cp}")
        release_memory()
        seconds = slowest(time.monotonic() - begin)
        series.record(f"{part} {name}", length, seconds)
        result.pop("wall_s", None)
        append_result(args.results, {**record, **result, "status": "ok", "seconds": seconds})


# --- report --------------------------------------------------------------------------------


def load_results(paths: Sequence[str]) -> list[dict]:
    """Records of the JSON-lines files, a later one replacing an earlier one of the same
    (part, name, T, P)."""
    records: dict[tuple, dict] = {}
    for path in paths:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = (record["part"], record["name"], record["T"], record["P"])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}:{number}: not a result line ({error})") from None
                records[key] = record
    return list(records.values())


def efficiencies(records: list[dict]) -> dict[tuple, float]:
    """(part, name, T, P) -> (P0 t(P0)) / (P t(P)), P0 the smallest P measured for the row."""
    done = [r for r in records if r.get("status") == "ok"]
    base: dict[tuple, dict] = {}
    for r in done:
        row = (r["part"], r["name"], r["T"])
        if row not in base or r["P"] < base[row]["P"]:
            base[row] = r
    result = {}
    for r in done:
        first = base[(r["part"], r["name"], r["T"])]
        result[(r["part"], r["name"], r["T"], r["P"])] = (
            first["P"] * first["ms"] / (r["P"] * r["ms"])
        )
    return result


def markdown(records: list[dict]) -> list[str]:
    """The markdown tables of the records: exactness checks, then layers and steps."""
    lines = []
    checks = sorted((r for r in records if r["part"] == "check"), key=lambda r: r["P"])
    if checks:
        lines += ["| check | T | CP | tensors outside the bound |", "|---|---|---|---|"]
        lines += [f"| {r['name']}, bf16 vs CP=1 | {length_label(r['T'])} | {r['P']} | "
                  f"{r['outside_bound']} |" for r in checks]
        lines.append("")
    efficiency = efficiencies(records)
    lines += [
        "| layer / step | T | CP | ms | scaling efficiency | CP comm ms | comm share | peak GiB | "
        "MB sent / rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"layer": 0, "step": 1}
    rows = sorted(
        (r for r in records if r["part"] in order),
        key=lambda r: (order[r["part"]], list(KINDS).index(r["name"])
                       if r["name"] in KINDS else len(KINDS), r["T"], r["P"]),
    )
    for r in rows:
        label = KINDS.get(r["name"], r["name"]) if r["part"] == "layer" else f"step, {r['name']}"
        head = f"| {label} | {length_label(r['T'])} | {r['P']} |"
        if r.get("status") != "ok":
            lines.append(f"{head} {r.get('status')} | | | | | |")
            continue
        peak = "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"{head} {r['ms']:.1f} | {efficiency[(r['part'], r['name'], r['T'], r['P'])]:.2f} | "
            f"{r['comm_ms']:.1f} | {100 * r['comm_share']:.1f}% | {peak} | {r['mb_sent']:.2f} |"
        )
    return lines


def plot(records: list[dict], path: str) -> None:
    """Step time against CP size, one line per T, with ideal scaling from the smallest P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["part"] == "step" and r.get("status") == "ok"]
    if not steps:
        raise ValueError("no step results to plot")
    figure, axes = plt.subplots(figsize=(6, 4))
    for length in sorted({r["T"] for r in steps}):
        points = sorted((r["P"], r["ms"] / 1e3) for r in steps if r["T"] == length)
        sizes, seconds = zip(*points, strict=True)
        line = axes.plot(sizes, seconds, "o-", label=f"T = {length_label(length)}")[0]
        axes.plot(sizes, [seconds[0] * sizes[0] / p for p in sizes], ":",
                  color=line.get_color())
    sizes = sorted({r["P"] for r in steps})
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(sizes, [str(p) for p in sizes])
    axes.set_xlabel("context-parallel size (GPUs)")
    axes.set_ylabel("training step (s)")
    name = steps[0]["name"]
    axes.set_title(f"{steps[0]['preset']} preset, {name}: step time (dotted: ideal)")
    axes.legend()
    figure.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}"
    figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    os.replace(tmp, path)


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", help="JSON-lines file the measurements are appended to")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2**18, 2**19, 2**20])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--steps", type=int, default=2,
                        help="timed layer steps after one warm-up")
    parser.add_argument("--step-steps", type=int, default=1,
                        help="timed training steps after one warm-up")
    parser.add_argument("--check-length", type=int, default=2**15, help="0: no check")
    parser.add_argument("--max-seconds", type=float, default=480.0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="350m")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the step model")
    parser.add_argument("--report", nargs="+", metavar="FILE",
                        help="table (and plot) result files instead of measuring")
    parser.add_argument("--markdown", help="with --report: write the table to FILE")
    parser.add_argument("--plot", help="with --report: plot step time to FILE (PNG)")
    args = parser.parse_args(argv)
    if args.report:
        return args
    if args.markdown or args.plot:
        raise SystemExit("--markdown and --plot go with --report")
    if not args.results:
        raise SystemExit("--results FILE is required (measurements are appended to it)")
    for name in ("steps", "step_steps", "vocab"):
        if getattr(args, name) < 1:
            raise SystemExit(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if args.max_seconds <= 0:
        raise SystemExit(f"--max-seconds must be positive, got {args.max_seconds}")
    return args


def check_lengths_for(args: argparse.Namespace, cp: int) -> None:
    """Lengths must split into 2 * CP chunks of whole selection query blocks."""
    query_block = PRESETS[args.preset].get("selection_query_block", 1)
    check_lengths("--lengths", args.lengths, 2 * cp * query_block)
    check_lengths("--check-length", [args.check_length], 2 * cp, allow_zero=True)


def report_files(args: argparse.Namespace) -> None:
    records = load_results(args.report)
    text = "\n".join(markdown(records)) + "\n"
    print(text, end="")
    if args.markdown:
        write_atomic(args.markdown, text)
    if args.plot:
        plot(records, args.plot)


def main() -> None:
    args = parse_args()
    if args.report:
        report_files(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_cp_scaling.py measures on CUDA GPUs (--report runs anywhere)")
    cp = int(os.environ.get("WORLD_SIZE", 1))
    if cp < 2 or "LOCAL_RANK" not in os.environ:
        raise SystemExit("run with torchrun --nproc-per-node P, P >= 2 (CP = P)")
    check_lengths_for(args, cp)
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    run(args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

