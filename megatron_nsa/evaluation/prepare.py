"""Prepare the data of a quality comparison (see megatron_nsa.evaluation.data).

    python -m megatron_nsa.evaluation.prepare --out data/quality [--packages json,re]
        [--heldout asyncio,email] [--passkey-fraction 0.1] [--seq-length 8192]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..data.tokenizer import DEFAULT_VOCAB_SIZE
from .data import HELDOUT_PACKAGES, prepare_quality_data


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_nsa.evaluation.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument("--packages", type=_list, help="training stdlib packages (default: all)")
    parser.add_argument("--heldout", type=_list, default=list(HELDOUT_PACKAGES),
                        help="held-out stdlib packages")
    parser.add_argument("--passkey-fraction", type=float, default=0.1,
                        help="share of training characters in passkey documents")
    parser.add_argument("--seq-length", type=int, default=8192,
                        help="training length; passkey documents stay below it")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        manifest = prepare_quality_data(
            args.out, packages=args.packages, heldout=args.heldout,
            passkey_fraction=args.passkey_fraction, seq_length=args.seq_length,
            vocab_size=args.vocab_size, seed=args.seed, overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {manifest['passkey_documents']} passkey documents "
          f"({manifest['passkey_char_share']:.1%} of the training characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
