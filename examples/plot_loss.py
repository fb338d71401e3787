"""Plot training loss against tokens seen, from the JSON-lines logs of pretrain_asa.py.

    python examples/plot_loss.py --log-file runs/asa.jsonl [--log-file runs/dense.jsonl] \\
        [--label ASA --label dense] [--smooth 20] --out loss.png

One curve per --log-file (`--log-file` of examples/pretrain_asa.py: one JSON object per step
with "step", "tokens", "loss" and, at evaluation steps, "eval_loss", drawn as points). A
resumed run appends to its log: a step logged twice keeps its last line. Needs matplotlib
(`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

X_AXES = ("tokens", "step")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plot_loss.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-file", type=Path, action="append", required=True,
        help="a --log-file of pretrain_asa.py (repeat for several runs)",
    )
    parser.add_argument("--label", action="append", help="one per --log-file (default: names)")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG to write")
    parser.add_argument("--x", choices=X_AXES, default="tokens", help="horizontal axis")
    parser.add_argument("--smooth", type=int, default=1, help="moving average over N steps")
    parser.add_argument("--title", default="training loss")
    return parser.parse_args(argv)


def read_log(path: Path, x: str) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """(x of each step, loss of each step, (x, eval loss) points) in step order."""
    if not path.is_file():
        raise ValueError(f"--log-file {path}: no such file")
    steps: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--log-file {path}:{number}: not JSON ({error})") from None
        missing = [key for key in ("step", x, "loss") if key not in record]
        if missing:
            raise ValueError(
                f"--log-file {path}:{number}: no {', '.join(missing)} (not a pretrain_asa.py "
                "log, or one from before it logged tokens: use --x step)"
            )
        steps[record["step"]] = record
    if not steps:
        raise ValueError(f"--log-file {path}: no steps logged")
    records = [steps[step] for step in sorted(steps)]
    evals = [(r[x], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    return [r[x] for r in records], [r["loss"] for r in records], evals


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(args: argparse.Namespace) -> Path:
    labels = args.label or [path.stem for path in args.log_file]
    if len(labels) != len(args.log_file):
        raise ValueError(
            f"--label given {len(labels)} times for {len(args.log_file)} --log-file: give one "
            "per log or none"
        )
    if args.smooth < 1:
        raise ValueError(f"--smooth {args.smooth} must be >= 1")
    runs = [read_log(path, args.x) for path in args.log_file]
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "plot_loss.py needs matplotlib: pip install matplotlib (or -e \".[plot]\")"
        ) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for label, (xs, loss, evals) in zip(labels, runs, strict=True):
        (line,) = axes.plot(xs, moving_average(loss, args.smooth), label=label, linewidth=1.2)
        if evals:
            axes.plot(*zip(*evals, strict=True), "o", color=line.get_color(),
                      label=f"{label} (eval)")
    axes.set_xlabel("tokens" if args.x == "tokens" else "step")
    axes.set_ylabel("loss" if args.smooth == 1 else f"loss (mean of {args.smooth} steps)")
    axes.set_title(args.title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(suffix=".png", dir=args.out.parent)
    os.close(handle)
    try:
        figure.savefig(scratch, format="png", dpi=120)
        os.replace(scratch, args.out)
    finally:
        plt.close(figure)
        Path(scratch).unlink(missing_ok=True)
    return args.out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = plot(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
