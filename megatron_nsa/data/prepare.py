"""Prepare a training corpus: train the tokenizer, tokenize into Megatron's indexed dataset.

    python -m megatron_nsa.data.prepare --corpus stdlib|PATH --out DIR [--vocab-size 8192]

writes DIR/tokenizer/ (a Hugging Face tokenizer folder), DIR/<name>_text_document.{bin,idx}
and DIR/summary.json. Everything is built in a temporary folder next to DIR and moved into
place at the end: a failure leaves DIR as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .corpus import DEFAULT_EXTENSIONS, DEFAULT_MAX_DOCUMENT_BYTES, Corpus, open_corpus
from .indexed import dataset_prefix, write_indexed_dataset
from .tokenizer import DEFAULT_VOCAB_SIZE, load_tokenizer, save_tokenizer, train_tokenizer

SUMMARY_FILE = "summary.json"
TOKENIZER_DIR = "tokenizer"


def _print(line: str) -> None:
    print(line, flush=True)


def _replace_dir(new: Path, out: Path, trash: Path) -> None:
    """Move `new` to `out`; what was at `out` goes to `trash`, or back if the move fails."""
    if not out.exists():
        new.rename(out)
        return
    out.rename(trash)
    try:
        new.rename(out)
    except BaseException:
        trash.rename(out)
        raise


def prepare_dataset(
    corpus: Corpus,
    out: str | os.PathLike,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    name: str | None = None,
    overwrite: bool = False,
    batch_size: int = 32,
    progress: Callable[[str], None] | None = _print,
) -> dict:
    """Train a tokenizer on `corpus` and write it with the tokenized dataset to `out`.

    Refuses a non-empty `out` unless `overwrite`; raises ValueError before writing anything
    when the corpus has no usable text. Returns the summary also written to summary.json.
    """
    out = Path(out)
    name = name or corpus.name
    log = progress or (lambda line: None)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass overwrite to replace it)")
    next(iter(corpus))  # a corpus without usable text raises ValueError here
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work = scratch / out.name  # made by mkdir, so it gets the usual permissions
    try:
        work.mkdir()
        log(f"training a byte-level BPE of {vocab_size} tokens on {corpus.name}")
        trained = train_tokenizer((document.text for document in corpus), vocab_size)
        tokenizer = load_tokenizer(save_tokenizer(trained, work / TOKENIZER_DIR))
        log(f"tokenizer trained in {time.perf_counter() - start:.1f} s; tokenizing")
        prefix = dataset_prefix(work, name)
        stats = write_indexed_dataset(
            corpus, tokenizer, prefix, batch_size=batch_size, progress=progress
        )
        summary = {
            "corpus": corpus.name,
            "dataset_prefix": prefix.name,
            "tokenizer": TOKENIZER_DIR,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "pad": tokenizer.pad,
            **stats.as_dict(),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (work / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        _replace_dir(work, out, scratch / "replaced")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(
        f"wrote {out}: {summary['documents']} documents, {summary['tokens']:,} tokens, longest "
        f"{summary['longest_document_tokens']:,} ({summary['longest_document']})"
    )
    return summary


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_nsa.data.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--corpus", required=True, help="'stdlib', a folder, or a .jsonl file")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--name", help="dataset name (default: the corpus name)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--packages", type=_list, help="stdlib: comma-separated top-level names")
    parser.add_argument(
        "--max-document-bytes",
        type=int,
        default=DEFAULT_MAX_DOCUMENT_BYTES,
        help="stdlib: packages larger than this are split",
    )
    parser.add_argument(
        "--extensions",
        type=_list,
        default=list(DEFAULT_EXTENSIONS),
        help="folder: comma-separated file extensions",
    )
    parser.add_argument(
        "--group-by-directory",
        action="store_true",
        help="folder: one document per directory instead of per file",
    )
    parser.add_argument("--field", default="text", help="JSONL: the field holding the text")
    parser.add_argument("--batch-size", type=int, default=32, help="documents per encode batch")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        corpus = open_corpus(
            args.corpus,
            packages=args.packages,
            extensions=args.extensions,
            group_by_directory=args.group_by_directory,
            field=args.field,
            max_document_bytes=args.max_document_bytes,
        )
        prepare_dataset(
            corpus,
            args.out,
            vocab_size=args.vocab_size,
            name=args.name,
            overwrite=args.overwrite,
            batch_size=args.batch_size,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
