"""Train a small ASA model on Python code, export it to Hugging Face and generate with it.

    python examples/quickstart.py [--train-iters N] [--seq-length 512] [--out-dir quickstart_out]

1. Prepares a handful of standard-library packages into Megatron's indexed dataset, with a
   byte-level BPE tokenizer trained on them (`megatron_nsa.data`): seconds.
2. Trains the `tiny` preset of examples/pretrain_asa.py (4 layers alternating local and
   global attention, pattern "LG") with context parallelism, through torchrun: two CPU
   processes joined by gloo (CP=2), two GPUs with NCCL (CP=2), or one GPU (CP=1). About two
   minutes with the defaults on two CPU cores; one line per step.
3. Saves a Megatron checkpoint and converts it to a Hugging Face folder, as
   `megatron-nsa export-hf` does (`pretrain_asa.py --export-hf`).
4. Loads the folder with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`
   and its tokenizer, and completes a Python prompt with `generate()`.

Everything goes to --out-dir: data/, checkpoints/, hf/ and metrics.jsonl (a rerun replaces
them). Library warnings are silenced unless PYTHONWARNINGS is set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

PRETRAIN = Path(__file__).resolve().with_name("pretrain_asa.py")
PACKAGES = (
    "argparse", "collections", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "functools", "heapq", "json", "pprint", "random", "shutil", "string", "textwrap",
)
"""About 560 KB of pure-Python standard library."""
PROMPT = "def read_config(path):\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="quickstart.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out-dir", type=Path, default=Path("quickstart_out"))
    parser.add_argument("--train-iters", type=int, default=120, help="training steps")
    parser.add_argument("--seq-length", type=int, default=512, help="tokens per sample")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="samples per step")
    parser.add_argument(
        "--packages", default=",".join(PACKAGES), help="comma-separated stdlib packages"
    )
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--log-interval", type=int, default=1, help="print every N steps")
    return parser.parse_args(argv)


def launch_plan() -> tuple[int, int, str]:
    """(processes, context-parallel size, what they run on): CP=2 needs two devices."""
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        return 2, 2, "2 GPUs, NCCL"
    if gpus == 1:
        return 1, 1, "1 GPU"
    return 2, 2, "2 CPU processes, gloo"


def prepare(args: argparse.Namespace, folder: Path) -> None:
    """The stdlib packages as Megatron's indexed dataset and a tokenizer, in `folder`."""
    from megatron_nsa.data import open_corpus, prepare_dataset

    packages = [name.strip() for name in args.packages.split(",") if name.strip()]
    corpus = open_corpus("stdlib", packages=packages)
    prepare_dataset(corpus, folder, vocab_size=args.vocab_size, overwrite=True)


def train_command(args: argparse.Namespace, nproc: int, cp: int, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", str(PRETRAIN),
        "--preset", "tiny", "--pattern", "LG", "--data", str(out / "data"), "--split", "100,0,0",
        "--context-parallel-size", str(cp), "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size),
        "--train-iters", str(args.train_iters), "--log-interval", str(args.log_interval),
        "--save", str(out / "checkpoints"), "--export-hf", str(out / "hf"),
        "--log-file", str(out / "metrics.jsonl"),
    ]


def child_env(nproc: int) -> dict[str, str]:
    """Threads split between the processes; no library warnings unless asked for."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def generate(folder: Path, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """(completion, new tokens) of `prompt` from the exported model, sampled with a fixed seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    batch = tokenizer(prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40,
        )
    new = out[0, batch.input_ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), new.numel()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for flag in ("train_iters", "seq_length", "micro_batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not sys.warnoptions and "PYTHONWARNINGS" not in os.environ:
        warnings.simplefilter("ignore")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoints", "hf"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    start = time.perf_counter()

    print(f"[1/4] preparing stdlib packages into {out / 'data'}", flush=True)
    try:
        prepare(args, out / "data")
    except ValueError as error:
        print(f"error: --packages: {error}", file=sys.stderr)
        return 2

    nproc, cp, where = launch_plan()
    command = train_command(args, nproc, cp, out)
    print(f"[2/4] training the tiny preset, CP={cp} on {where}:\n  {' '.join(command)}",
          flush=True)
    status = subprocess.run(command, env=child_env(nproc)).returncode
    if status != 0:
        print(f"error: training exited with status {status}", file=sys.stderr)
        return status

    print(f"[3/4] exported to {out / 'hf'} (checkpoint in {out / 'checkpoints'})", flush=True)
    completion, count = generate(out / "hf", args.prompt, args.max_new_tokens)
    print(f"[4/4] generate() with AutoModelForCausalLM, {count} new tokens:\n", flush=True)
    print(args.prompt + completion)
    print(f"\ndone in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
