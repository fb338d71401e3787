"""The `megatron-nsa` command: conversion between Megatron checkpoints and Hugging Face.

    megatron-nsa export-hf --load CKPT_DIR --out HF_DIR [--overwrite] [--dtype bfloat16]
    megatron-nsa import-hf --load HF_DIR --out CKPT_DIR --tensor-parallel-size N \
        --pipeline-parallel-size M [--overwrite]
    megatron-nsa evaluate --model HF_DIR --heldout DATA_DIR --out RESULTS_JSON [...]

Bad input (a missing or partial checkpoint, a checkpoint that is not ASA, a configuration
the other side cannot express, an existing output folder) ends with a one-line error and
exit status 2, and no output folder.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-nsa", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser(
        "export-hf", help="Megatron torch_dist checkpoint -> Hugging Face folder"
    )
    export.add_argument(
        "--load", required=True, help="checkpoint folder (or Megatron-LM save folder)"
    )
    export.add_argument("--out", required=True, help="Hugging Face folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep)")
    export.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's)")
    export.add_argument("--max-shard-size", default="5GB", help="per safetensors file")

    imp = commands.add_parser(
        "import-hf", help="Hugging Face folder -> Megatron torch_dist checkpoint"
    )
    imp.add_argument("--load", required=True, help="Hugging Face folder written by export-hf")
    imp.add_argument("--out", required=True, help="checkpoint folder to write")
    imp.add_argument("--tensor-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-parallel-size", type=int, default=1)
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    commands.add_parser(
        "evaluate", add_help=False,
        help="held-out loss, passkey retrieval and KV bytes of a Hugging Face model "
        "(megatron-nsa evaluate --help)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:  # its own parser: megatron_nsa.evaluation.evaluate
        from .evaluation.evaluate import main as evaluate

        return evaluate(argv[1:], prog="megatron-nsa evaluate")
    args = _parser().parse_args(argv)
    # Imported here: transformers takes seconds to import; --help should not.
    import torch

    from .hf.errors import ConversionError

    try:
        if args.command == "export-hf":
            from .hf.export import export_hf

            export_hf(
                args.load,
                args.out,
                overwrite=args.overwrite,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                tokenizer=args.tokenizer,
                max_shard_size=args.max_shard_size,
            )
        else:
            from .hf.import_hf import import_hf

            import_hf(
                args.load,
                args.out,
                tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size,
                overwrite=args.overwrite,
            )
    except ConversionError as error:
        print(f"megatron-nsa {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
