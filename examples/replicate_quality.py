"""Train same-size models that differ only in attention, on the same tokens, and score each.

    python -m megatron_nsa.evaluation.prepare --out data/quality     # once, on any machine
    python examples/replicate_quality.py --data data/quality --out runs/quality
    python examples/plot_quality.py runs/quality                      # PNGs + markdown table
    python examples/replicate_quality.py --tiny --out /tmp/quality    # CPU, well under a minute

For each layer pattern (default: ASA "LG", classic NSA "N", dense GQA "D", all-global "G")
the model of `--preset` trains with examples/pretrain_asa.py's `main` in this process (one
GPU or one CPU process), is converted with `megatron_nsa.hf.export_hf`, and is scored from
its Hugging Face folder by `megatron_nsa.evaluation`. Every pattern takes the same number
of steps over the same samples with the same seed. Without --train-iters that number comes
from a calibration: a few timed steps of the slowest patterns (N and G), so that the slowest
model trains for about --train-seconds.

--out receives results.json (rewritten after every model), logs/<pattern>.jsonl (one line
per step) and logs/<pattern>.txt (the training output); checkpoints and Hugging Face folders
go to --work (default: <out>/work).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import redirect_stdout
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpu_compat  # noqa: E402
import pretrain_asa  # noqa: E402

from megatron_nsa.evaluation import (  # noqa: E402
    EvalSettings,
    evaluate_folder,
    prepare_quality_data,
    write_json,
)
from megatron_nsa.evaluation.data import HELDOUT_FILE, MANIFEST_FILE  # noqa: E402

PATTERNS = ("LG", "N", "D", "G")
"""Run order: G (the all-global ablation) last, so a run cut short keeps the baselines."""
KINDS = set("LGDN")
CALIBRATED = ("N", "G")
"""The slowest patterns (every layer sparse); their step time sets the step count."""
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
FULL = dict(
    preset="30m", seq_length=8192, micro_batch_size=8, global_batch_size=8,
    calibration_iters=6, max_train_iters=5000,
    **{k: v for k, v in asdict(EvalSettings()).items() if k not in ("seed", "kv_value_bytes")},
)
"""Defaults: the GPU run of docs/evaluation.md (about 35M parameters, 8k context)."""
TINY = dict(
    preset="tiny", seq_length=128, micro_batch_size=2, global_batch_size=2,
    calibration_iters=2, max_train_iters=2,
    lengths=(96, 128), depths=(0.0, 1.0), samples=1, loss_tokens=256, batch_tokens=256,
)
"""Defaults under --tiny: a CPU run of a few seconds per model."""
TINY_DATA = dict(packages=["json"], heldout=["tomllib"], vocab_size=512)


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.split(",") if v.strip())


def _patterns(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="replicate_quality.py", description=__doc__.splitlines()[0],
        epilog="Defaults: " + ", ".join(f"{k}={v}" for k, v in FULL.items())
        + "; under --tiny: " + ", ".join(f"{k}={v}" for k, v in TINY.items()),
    )
    parser.add_argument("--data", type=Path,
                        help="folder made by `python -m megatron_nsa.evaluation.prepare`")
    parser.add_argument("--out", type=Path, required=True, help="results and logs")
    parser.add_argument("--work", type=Path, help="checkpoints and HF folders (default: OUT/work)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU-sized run on a small corpus prepared into WORK/data")
    parser.add_argument("--patterns", type=_patterns, default=PATTERNS,
                        help="comma-separated layer patterns over L, G, D, N")
    train = parser.add_argument_group("training (every pattern alike)")
    train.add_argument("--preset", choices=sorted(pretrain_asa.PRESETS))
    train.add_argument("--seq-length", type=int)
    train.add_argument("--micro-batch-size", type=int)
    train.add_argument("--global-batch-size", type=int)
    train.add_argument("--lr", type=float, help="default: the preset's")
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--train-iters", type=int, help="steps per model (skips calibration)")
    train.add_argument("--train-seconds", type=float, default=80.0,
                       help="calibration target: training time of the slowest model")
    train.add_argument("--calibration-iters", type=int,
                       help="steps per calibrated pattern (the first, compiling, is not timed)")
    train.add_argument("--max-train-iters", type=int, help="upper bound of the calibration")
    evaluation = parser.add_argument_group("evaluation (megatron_nsa.evaluation)")
    evaluation.add_argument("--lengths", type=_ints)
    evaluation.add_argument("--depths", type=_floats)
    evaluation.add_argument("--samples", type=int)
    evaluation.add_argument("--loss-tokens", type=int)
    evaluation.add_argument("--batch-tokens", type=int)
    evaluation.add_argument("--eval-seed", type=int, default=EvalSettings().seed)
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.work = args.work or args.out / "work"
    return args


def check_args(args: argparse.Namespace) -> EvalSettings:
    """Every flag checked before any data is read or model built."""
    for pattern in args.patterns:
        if not pattern or set(pattern) - KINDS:
            raise ValueError(f"--patterns: {pattern!r} is not a string over L, G, D, N")
    if len(set(args.patterns)) != len(args.patterns):
        raise ValueError(f"--patterns {','.join(args.patterns)} names a pattern twice")
    for flag in ("seq_length", "micro_batch_size", "global_batch_size", "calibration_iters",
                 "max_train_iters"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.global_batch_size % args.micro_batch_size:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of "
            f"--micro-batch-size {args.micro_batch_size}"
        )
    if args.train_iters is not None and args.train_iters < 1:
        raise ValueError(f"--train-iters {args.train_iters} must be >= 1")
    if args.train_seconds <= 0:
        raise ValueError(f"--train-seconds {args.train_seconds} must be > 0")
    if args.calibration_iters < 2 and args.train_iters is None:
        raise ValueError("--calibration-iters must be >= 2 (the first step is not timed)")
    if args.data is None and not args.tiny:
        raise ValueError("--data is required (or --tiny, which prepares a small corpus)")
    if args.data is not None and not (args.data / HELDOUT_FILE).is_file():
        raise ValueError(
            f"--data {args.data}: no {HELDOUT_FILE}; prepare the folder with "
            f"`python -m megatron_nsa.evaluation.prepare --out {args.data}`"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("run this script as one process (python, not torchrun)")
    settings = EvalSettings(
        lengths=args.lengths, depths=args.depths, samples=args.samples,
        loss_tokens=args.loss_tokens, batch_tokens=args.batch_tokens, seed=args.eval_seed,
    )
    settings.check()
    return settings


def install_cpu_standins_once() -> None:
    """pretrain_asa installs the CPU stand-ins on every call; they patch torch globally and
    must not stack, so later calls become no-ops."""
    original, done = cpu_compat.install_cpu_standins, []

    def once() -> None:
        if not done:
            original()
            done.append(True)

    cpu_compat.install_cpu_standins = once


def release_process_group_env(inherited: set[str]) -> None:
    """Drop the rendezvous variables pretrain_asa set, so the next run picks a free port."""
    for name in DIST_ENV:
        if name not in inherited:
            os.environ.pop(name, None)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_seconds(log: list[dict], tokens_per_step: int) -> float:
    """Median step time, leaving out the first step (it compiles the kernels)."""
    timed = log[1:] or log
    return statistics.median(tokens_per_step / entry["tokens_per_s"] for entry in timed)


def calibrated_iters(seconds_per_step: dict[str, float], train_seconds: float,
                     max_iters: int) -> int:
    """Steps that the slowest pattern takes in `train_seconds` (at least 1, at most max)."""
    slowest = max(seconds_per_step.values())
    return max(1, min(max_iters, int(train_seconds / slowest)))


class Runner:
    """Trains, exports and scores one pattern at a time, in this process."""

    def __init__(self, args: argparse.Namespace, settings: EvalSettings) -> None:
        self.args, self.settings = args, settings
        self.inherited = {name for name in DIST_ENV if name in os.environ}
        self.logs = args.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        self.tokens_per_step = args.global_batch_size * args.seq_length

    def pretrain(self, pattern: str, iters: int, name: str, save: Path | None) -> dict:
        """Run pretrain_asa.main; its output goes to logs/<name>.txt."""
        args = self.args
        log_file = self.logs / f"{name}.jsonl"
        log_file.unlink(missing_ok=True)
        argv = [
            "--preset", args.preset, "--pattern", pattern, "--data", str(args.data),
            "--seq-length", str(args.seq_length), "--train-iters", str(iters),
            "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.global_batch_size), "--seed", str(args.seed),
            "--split", "100,0,0", "--log-file", str(log_file),
        ]
        if args.lr is not None:
            argv += ["--lr", str(args.lr)]
        if save is not None:
            argv += ["--save", str(save)]
        start = time.perf_counter()
        with open(self.logs / f"{name}.txt", "w") as output, redirect_stdout(output):
            code = pretrain_asa.main(argv)
        seconds = time.perf_counter() - start
        release_process_group_env(self.inherited)
        free_memory()
        if code != 0:
            raise RuntimeError(
                f"pretrain_asa.py {' '.join(argv)} failed with exit status {code} "
                f"(its output: {self.logs / f'{name}.txt'})"
            )
        log = read_log(log_file)
        return {
            "iterations": iters,
            "tokens": iters * self.tokens_per_step,
            "wall_seconds": round(seconds, 1),
            "step_seconds": round(step_seconds(log, self.tokens_per_step), 4),
            "final_loss": statistics.fmean(entry["loss"] for entry in log[-10:]),
            "log": str(log_file.relative_to(self.args.out)),
        }

    def calibrate(self) -> tuple[int, dict]:
        args = self.args
        if args.train_iters is not None:
            return args.train_iters, {}
        patterns = [p for p in CALIBRATED if p in args.patterns] or [args.patterns[0]]
        runs = {p: self.pretrain(p, args.calibration_iters, f"calibration_{p}", None)
                for p in patterns}
        seconds = {p: run["step_seconds"] for p, run in runs.items()}
        iters = calibrated_iters(seconds, args.train_seconds, args.max_train_iters)
        print(f"calibration: seconds per step {seconds} -> {iters} steps per model", flush=True)
        return iters, {"step_seconds": seconds, "train_seconds": args.train_seconds,
                       "iterations": iters}

    def run_pattern(self, pattern: str, iters: int) -> dict:
        save = self.args.work / f"ckpt_{pattern}"
        hf = self.args.work / f"hf_{pattern}"  # distinct names: transformers caches code by name
        train = self.pretrain(pattern, iters, pattern, save)
        from megatron_nsa.hf import export_hf

        start = time.perf_counter()
        export_hf(save, hf, overwrite=True)
        export_seconds = time.perf_counter() - start
        result = evaluate_folder(
            hf, self.args.data, self.settings,
            progress=lambda line: print(f"  {pattern}: {line}", flush=True),
        )
        free_memory()
        result["train"] = train
        result["seconds"]["export"] = round(export_seconds, 2)
        return result


def setup(args: argparse.Namespace, settings: EvalSettings) -> dict:
    manifest_file = args.data / MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    training = pretrain_asa.PRESET_TRAINING[args.preset]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "architecture": pretrain_asa.PRESETS[args.preset],
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "lr": args.lr or training["lr"],
        "lr_warmup_iters": training["lr_warmup_iters"],
        "seed": args.seed,
        "data": manifest,
        "evaluation": asdict(settings),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def run(args: argparse.Namespace) -> dict:
    settings = check_args(args)
    start = time.perf_counter()
    if args.tiny and args.data is None:
        args.data = args.work / "data"
        if not (args.data / HELDOUT_FILE).is_file():
            prepare_quality_data(args.data, seq_length=args.seq_length, overwrite=True,
                                 progress=None, **TINY_DATA)
    install_cpu_standins_once()
    runner = Runner(args, settings)
    results = {"setup": setup(args, settings), "models": {}}
    iters, results["calibration"] = runner.calibrate()
    path = args.out / "results.json"
    for pattern in args.patterns:
        print(f"{pattern}: training {iters} steps", flush=True)
        results["models"][pattern] = model = runner.run_pattern(pattern, iters)
        results["wall_seconds"] = round(time.perf_counter() - start, 1)
        write_json(results, path)
        loss = model["heldout_loss"]
        kv = model["kv_cache"][str(settings.lengths[0])]["bytes_per_token"]
        print(
            f"{pattern}: {model['parameters'] / 1e6:.1f}M parameters, train loss "
            f"{model['train']['final_loss']:.3f}, held-out loss "
            + ", ".join(f"{n}: {v['loss']:.3f}" for n, v in loss.items())
            + ", passkey " + ", ".join(
                f"{n}: {v:.0%}" for n, v in model["passkey"]["by_length"].items()
            )
            + f", KV {kv:.0f} B/token ({time.perf_counter() - start:.0f} s so far)",
            flush=True,
        )
    print(f"wrote {path}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
