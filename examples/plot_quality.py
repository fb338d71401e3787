"""Tables and figures of a replicate_quality.py run.

    python examples/plot_quality.py runs/quality [--out runs/quality]

writes table.md (markdown: held-out loss, passkey accuracy per length and per depth, KV
cache bytes per token), loss_curves.png (training loss against tokens, held-out loss
against length) and passkey_heatmap.png (accuracy, depth x length, one panel per model).
The table needs nothing beyond the standard library; the figures need matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

SMOOTHING = 0.9
"""Exponential moving average of the training-loss curves (the raw curve is drawn faintly)."""


def load_run(folder: Path) -> dict:
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no results.json (run examples/replicate_quality.py first)")
    results = json.loads(path.read_text())
    if not results.get("models"):
        raise ValueError(f"{path}: holds no models")
    return results


def training_log(folder: Path, model: dict) -> list[dict]:
    path = folder / model["train"]["log"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _k(length: str | int) -> str:
    return f"{int(length) // 1024}k" if int(length) % 1024 == 0 else str(length)


def markdown_table(results: dict) -> str:
    """The summary table and the per-depth passkey table."""
    models = results["models"]
    lengths = list(next(iter(models.values()))["heldout_loss"])
    nsa = models.get("N")
    head = ["model", "params (M)", "train loss"]
    head += [f"loss @ {_k(n)}" for n in lengths] + [f"passkey @ {_k(n)}" for n in lengths]
    head += [f"KV B/token @ {_k(n)}" for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, model in models.items():
        kv = [model["kv_cache"][n]["bytes_per_token"] for n in lengths]
        kv_cells = [f"{b:,.0f}" for b in kv]
        if nsa is not None and name != "N":
            kv_cells = [
                f"{b:,.0f} ({b / nsa['kv_cache'][n]['bytes_per_token']:.0%} of N)"
                for b, n in zip(kv, lengths, strict=True)
            ]
        cells = [name, f"{model['parameters'] / 1e6:.1f}", f"{model['train']['final_loss']:.3f}"]
        cells += [f"{model['heldout_loss'][n]['loss']:.3f}" for n in lengths]
        cells += [f"{model['passkey']['by_length'][n]:.0%}" for n in lengths]
        lines.append("| " + " | ".join(cells + kv_cells) + " |")
    lines += ["", "Passkey accuracy per needle depth (correct / samples):", ""]
    lines += ["| model | depth | " + " | ".join(_k(n) for n in lengths) + " |",
              "|" + " --- |" * (len(lengths) + 2)]
    for name, model in models.items():
        cells = {(str(c["length"]), c["depth"]): c for c in model["passkey"]["cells"]}
        for depth in sorted({depth for _, depth in cells}):
            row = [f"{cells[n, depth]['correct']}/{cells[n, depth]['samples']}" for n in lengths]
            lines.append(f"| {name} | {depth:g} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def save(plt, figure, path: Path) -> None:
    """Write to a temporary sibling, then rename into place."""
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    figure.savefig(partial, dpi=120, bbox_inches="tight")
    plt.close(figure)
    partial.replace(path)


def _smooth(values: list[float]) -> list[float]:
    out, average = [], values[0]
    for value in values:
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        out.append(average)
    return out


def plot_losses(plt, folder: Path, results: dict, path: Path) -> None:
    figure, (curves, lengths) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, model in results["models"].items():
        log = training_log(folder, model)
        per_step = model["train"]["tokens"] / model["train"]["iterations"]
        tokens = [entry["step"] * per_step / 1e6 for entry in log]
        losses = [entry["loss"] for entry in log]
        (line,) = curves.plot(tokens, _smooth(losses), label=name)
        curves.plot(tokens, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
        held = model["heldout_loss"]
        lengths.plot([int(n) for n in held], [v["loss"] for v in held.values()], "o-", label=name)
    curves.set(xlabel="training tokens (M)", ylabel="training loss (nats)",
               title="training loss (EMA; raw faint)")
    lengths.set(xlabel="context length (tokens)", ylabel="held-out loss (nats)",
                title="held-out loss by evaluation length")
    lengths.set_xscale("log", base=2)
    lengths.minorticks_off()
    lengths.set_xticks([int(n) for n in held], [_k(n) for n in held])
    for axes in (curves, lengths):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    save(plt, figure, path)


def plot_passkey(plt, results: dict, path: Path) -> None:
    models = results["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models) + 1, 3.6),
                                squeeze=False, layout="constrained")
    image = None
    for panel, (name, model) in zip(axes[0], models.items(), strict=True):
        cells = model["passkey"]["cells"]
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = [[0.0] * len(lengths) for _ in depths]
        for c in cells:
            grid[depths.index(c["depth"])][lengths.index(c["length"])] = c["accuracy"]
        image = panel.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                panel.text(j, i, f"{value:.0%}", ha="center", va="center",
                           color="white" if value < 0.5 else "black", fontsize=8)
        panel.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
        panel.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        panel.set(title=name, xlabel="length (tokens)")
    axes[0][0].set_ylabel("needle depth (share of the haystack before it)")
    figure.colorbar(image, ax=axes[0].tolist(), label="exact-match accuracy")
    save(plt, figure, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_quality.py", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the --out folder of replicate_quality.py")
    parser.add_argument("--out", type=Path, help="where to write (default: the run folder)")
    args = parser.parse_args(argv)
    out = args.out or args.run
    try:
        results = load_run(args.run)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table = out / "table.md"
    partial = out / ".table.md.partial"
    partial.write_text(markdown_table(results))
    partial.replace(table)
    print(f"wrote {table}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: the figures need matplotlib (pip install matplotlib); table.md is written",
              file=sys.stderr)
        return 2
    plot_losses(plt, args.run, results, out / "loss_curves.png")
    plot_passkey(plt, results, out / "passkey_heatmap.png")
    print(f"wrote {out / 'loss_curves.png'} and {out / 'passkey_heatmap.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
