"""Corpus readers: each yields `Document`s (a name and its text), re-iterable, so a corpus can
be read once to train the tokenizer and again to tokenize it.

Every reader raises a `ValueError` naming the path and what it looked for when it finds no
usable text, so that a wrong path fails before anything is written.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEFAULT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
# About 600k tokens of code with an 8k BPE: long enough for 64k+ sequences, small enough that
# the test package (17 MB) does not become half of the corpus in one document.
DEFAULT_MAX_DOCUMENT_BYTES = 2**21


@dataclass(frozen=True)
class Document:
    """One training document; `name` says where it came from, for progress and statistics."""

    name: str
    text: str


class Corpus(Protocol):
    """What the tokenizer trainer and the dataset writer consume."""

    name: str

    def __iter__(self) -> Iterator[Document]: ...


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text or holds only whitespace.

    Test suites ship deliberately mis-encoded or binary files; they are skipped, not repaired.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\x00" in text or not text.strip():
        return None
    return text


def join_files(root: Path, files: Iterable[Path]) -> str:
    """Concatenate files, each under a one-line header naming it relative to `root`."""
    parts = []
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        if not text.endswith("\n"):
            text += "\n"
        parts.append(f"# file: {path.relative_to(root).as_posix()}\n{text}")
    return "\n".join(parts)


def _skipped(directory_name: str) -> bool:
    return directory_name.startswith(".") or directory_name in ("site-packages", "__pycache__")


def _walk(root: Path, extensions: Sequence[str]) -> Iterator[tuple[Path, list[Path]]]:
    """(directory, its matching files sorted) for every directory under root, in sorted
    order, leaving out hidden directories, `__pycache__` and `site-packages`."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not _skipped(d))
        matching = sorted(Path(directory, f) for f in files if f.endswith(tuple(extensions)))
        yield Path(directory), matching


def _tree_files(root: Path, extensions: Sequence[str]) -> list[Path]:
    return [path for _, files in _walk(root, extensions) for path in files]


def _size(files: Iterable[Path]) -> int:
    return sum(path.stat().st_size for path in files)


def _fail_if_empty(count: int, path: Path, looked_for: str) -> None:
    if count == 0:
        raise ValueError(f"{path}: no usable text found (looked for {looked_for})")


class StdlibCorpus:
    """The Python standard library source, one document per package.

    A package (a top-level directory) is one document: its .py files, sub-packages included,
    concatenated in sorted order under a header line per file. A package larger than
    `max_document_bytes` is split: each sub-package by the same rule, and its own modules
    grouped in sorted order into runs below the limit. Top-level modules are documents of
    their own. `packages` restricts the corpus to some top-level names (packages or modules).
    """

    def __init__(
        self,
        packages: Sequence[str] | None = None,
        *,
        root: str | os.PathLike | None = None,
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    ) -> None:
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        self.name = "stdlib"
        self.max_document_bytes = max_document_bytes
        self.packages = list(packages) if packages is not None else None
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a directory (looked for the stdlib source)")
        if self.packages is not None:
            missing = [p for p in self.packages if not self._top_level(p).exists()]
            if missing:
                raise ValueError(f"{self.root}: no stdlib package or module named {missing}")

    def _top_level(self, name: str) -> Path:
        package = self.root / name
        return package if package.is_dir() else self.root / f"{name}.py"

    def _names(self) -> list[str]:
        if self.packages is not None:
            return self.packages
        names = []
        for entry in sorted(self.root.iterdir()):
            if _skipped(entry.name):
                continue
            if entry.is_dir() and (entry / "__init__.py").exists():
                names.append(entry.name)
            elif entry.is_file() and entry.suffix == ".py":
                names.append(entry.stem)
        return names

    def _package(self, directory: Path) -> Iterator[Document]:
        name = directory.relative_to(self.root).as_posix()
        files = _tree_files(directory, (".py",))
        if _size(files) <= self.max_document_bytes:
            yield Document(name, join_files(self.root, files))
            return
        for sub in sorted(d for d in directory.iterdir() if d.is_dir() and not _skipped(d.name)):
            yield from self._package(sub)
        run: list[Path] = []
        run_bytes = part = 0
        for path in sorted(directory.glob("*.py")):
            size = path.stat().st_size
            if run and run_bytes + size > self.max_document_bytes:
                part += 1
                yield Document(f"{name}[{part}]", join_files(self.root, run))
                run, run_bytes = [], 0
            run.append(path)
            run_bytes += size
        if run:
            yield Document(f"{name}[{part + 1}]" if part else name, join_files(self.root, run))

    def __iter__(self) -> Iterator[Document]:
        count = 0
        for name in self._names():
            path = self._top_level(name)
            if path.is_dir():
                documents = self._package(path)
            else:
                text = read_text(path)
                documents = iter([Document(name, text)] if text else [])
            for document in documents:
                if document.text:
                    count += 1
                    yield document
        _fail_if_empty(count, self.root, f".py files of {self.packages or 'all packages'}")


class FolderCorpus:
    """UTF-8 text files under a folder, recursively: each file a document, or (with
    `group_by_directory`) the files directly in each directory concatenated under a header
    line per file. Hidden folders, `__pycache__` and `site-packages` are skipped."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        group_by_directory: bool = False,
    ) -> None:
        self.root = Path(path)
        self.name = self.root.resolve().name
        self.extensions = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
        self.group_by_directory = group_by_directory
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a directory (looked for a folder of text files)")

    def __iter__(self) -> Iterator[Document]:
        count = 0
        for directory, files in _walk(self.root, self.extensions):
            if self.group_by_directory:
                text = join_files(self.root, files)
                if text:
                    count += 1
                    yield Document(directory.relative_to(self.root).as_posix(), text)
                continue
            for path in files:
                text = read_text(path)
                if text is not None:
                    count += 1
                    yield Document(path.relative_to(self.root).as_posix(), text)
        _fail_if_empty(count, self.root, f"UTF-8 files ending in {', '.join(self.extensions)}")


class JsonlCorpus:
    """One document per line of a JSON Lines file, taken from a string field.

    Lines whose field is an empty string are skipped; a line that is not a JSON object with
    that field as a string is an error, reported with its line number.
    """

    def __init__(self, path: str | os.PathLike, *, field: str = "text") -> None:
        self.path = Path(path)
        self.name = self.path.stem
        self.field = field
        if not self.path.is_file():
            raise ValueError(f"{self.path}: not a file (looked for a JSONL file)")

    def __iter__(self) -> Iterator[Document]:
        count = 0
        with self.path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{self.path}:{number}: not valid JSON ({error})") from None
                text = record.get(self.field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(
                        f"{self.path}:{number}: no string field {self.field!r} "
                        f"(looked for JSON objects with a {self.field!r} field)"
                    )
                if text.strip():
                    count += 1
                    yield Document(f"{self.path.name}:{number}", text)
        _fail_if_empty(count, self.path, f"non-empty {self.field!r} fields")


def open_corpus(
    spec: str | os.PathLike,
    *,
    packages: Sequence[str] | None = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    group_by_directory: bool = False,
    field: str = "text",
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
) -> Corpus:
    """`"stdlib"`, a folder, or a .jsonl file, read by the matching reader."""
    if str(spec) == "stdlib":
        return StdlibCorpus(packages, max_document_bytes=max_document_bytes)
    path = Path(spec)
    if path.is_dir():
        return FolderCorpus(path, extensions=extensions, group_by_directory=group_by_directory)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return JsonlCorpus(path, field=field)
    raise ValueError(
        f"{path}: not a corpus (looked for 'stdlib', a folder of text files or a .jsonl file)"
    )
