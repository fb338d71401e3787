"""Score a Hugging Face causal LM: held-out loss and passkey retrieval at several lengths,
and its decode-cache bytes per token.

    megatron-nsa evaluate --model HF_DIR --heldout DATA_DIR --out results.json \\
        [--lengths 8192,16384,32768] [--depths 0,0.25,0.5,0.75,1] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data import read_heldout
from .heldout import heldout_loss, loss_windows, tokenize_documents
from .models import DTYPES, kv_bytes_per_token, load_model
from .passkey import PasskeyTask, check_grid, score_passkey, summarize


@dataclass(frozen=True)
class EvalSettings:
    """What to measure. `batch_tokens` bounds the tokens of one forward (at least one
    sequence); `loss_tokens` is the held-out token budget of each length."""

    lengths: tuple[int, ...] = (8192, 16384, 32768)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4
    loss_tokens: int = 65536
    batch_tokens: int = 65536
    seed: int = 0
    kv_value_bytes: int = 2

    def check(self) -> None:
        check_grid(self.lengths, self.depths, self.samples)
        if self.loss_tokens < max(self.lengths):
            raise ValueError(
                f"loss_tokens={self.loss_tokens} must be >= the longest length "
                f"{max(self.lengths)} (one window)"
            )
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens={self.batch_tokens} must be >= 1")

    def batch(self, length: int) -> int:
        return max(1, self.batch_tokens // length)


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        return value


def evaluate_model(model, tokenizer, heldout_texts: Sequence[str],
                   settings: EvalSettings = EvalSettings(),
                   progress: Callable[[str], None] | None = None) -> dict:
    """Held-out loss per length, passkey accuracy per (length, depth), KV bytes per token.

    Every input is checked (the grid, the held-out text's length) before the model runs.
    """
    settings.check()
    log = progress or (lambda line: None)
    timer = Timer()
    documents = tokenize_documents(tokenizer, heldout_texts)
    for length in settings.lengths:  # fail before any forward when the text is too short
        loss_windows(documents, length, settings.loss_tokens)
    task = PasskeyTask(tokenizer, heldout_texts, seed=settings.seed)
    prompts = timer.run(
        "prompts", task.prompts, settings.lengths, settings.depths, settings.samples
    )
    losses = {}
    for length in settings.lengths:
        result = timer.run(
            f"loss_{length}", heldout_loss, model, documents, length, settings.loss_tokens,
            settings.batch(length),
        )
        losses[str(length)] = result.as_dict()
        log(f"held-out loss @ {length}: {result.loss:.4f} ({result.tokens} tokens)")
    results = []
    for length in settings.lengths:
        group = [p for p in prompts if p.length == length]
        scored = timer.run(
            f"passkey_{length}", score_passkey, model, group, batch_size=settings.batch(length)
        )
        results.extend(scored)
        hits = sum(r.correct for r in scored)
        log(f"passkey @ {length}: {hits}/{len(scored)}")
    passkey = summarize(results)
    passkey["results"] = [
        {**{k: v for k, v in asdict(r).items() if k != "generated_ids"},
         "generated": tokenizer.decode(r.generated_ids)}
        for r in results
    ]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_loss": losses,
        "passkey": passkey,
        "kv_cache": kv_bytes_per_token(model.config, settings.lengths, settings.kv_value_bytes),
        "settings": asdict(settings),
        "seconds": timer.seconds,
    }


def evaluate_folder(path: str | os.PathLike, heldout: str | os.PathLike,
                    settings: EvalSettings = EvalSettings(), *, device: str = "auto",
                    dtype: str | None = None,
                    progress: Callable[[str], None] | None = None) -> dict:
    """`evaluate_model` on a Hugging Face folder (loaded with its own tokenizer)."""
    settings.check()
    texts = read_heldout(heldout)
    model, tokenizer = load_model(path, device=device, dtype=dtype)
    result = evaluate_model(model, tokenizer, texts, settings, progress)
    result["model"] = str(path)
    result["device"] = str(next(model.parameters()).device)
    result["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return result


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write to a temporary sibling, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)
    return path


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in value.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EvalSettings()
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--heldout", required=True,
                        help="folder with heldout.jsonl (or the .jsonl file itself)")
    parser.add_argument("--out", required=True, help="results JSON to write")
    parser.add_argument("--lengths", type=_ints, default=defaults.lengths,
                        help="comma-separated prompt lengths in tokens")
    parser.add_argument("--depths", type=_floats, default=defaults.depths,
                        help="comma-separated needle depths in [0, 1]")
    parser.add_argument("--samples", type=int, default=defaults.samples,
                        help="prompts per (length, depth)")
    parser.add_argument("--loss-tokens", type=int, default=defaults.loss_tokens,
                        help="held-out tokens scored at each length")
    parser.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens,
                        help="tokens per forward (at least one sequence)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, else float32")


def run(args: argparse.Namespace, prog: str) -> int:
    settings = EvalSettings(
        lengths=args.lengths, depths=args.depths, samples=args.samples,
        loss_tokens=args.loss_tokens, batch_tokens=args.batch_tokens, seed=args.seed,
    )
    try:
        result = evaluate_folder(
            args.model, args.heldout, settings, device=args.device, dtype=args.dtype,
            progress=lambda line: print(line, flush=True),
        )
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {write_json(result, args.out)}")
    return 0


def main(argv: Sequence[str] | None = None,
         prog: str = "python -m megatron_nsa.evaluation") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), prog)


if __name__ == "__main__":
    sys.exit(main())
