"""Write a folder completely or not at all.

Conversions write into a temporary sibling of the output folder and rename it into place at
the end, so an interrupted or failed run never leaves a half-written output folder.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import ConversionError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """The output folder as a Path; refuses an existing one unless `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"output folder {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output path {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; on success it replaces `out`.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    check_output(out, overwrite)
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
