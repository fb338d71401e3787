"""Corpus readers: stdlib per package, folders, JSONL, and clear errors on unusable paths."""

import json
import sysconfig
from pathlib import Path

import pytest

from megatron_nsa.data import FolderCorpus, JsonlCorpus, StdlibCorpus, open_corpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_is_one_document_per_package_with_its_files():
    documents = list(StdlibCorpus(["json", "email", "bisect"]))
    assert [d.name for d in documents] == ["json", "email", "bisect"]
    assert all(d.text.strip() for d in documents)
    json_doc, email_doc, bisect_doc = (d.text for d in documents)
    assert "# file: json/decoder.py\n" in json_doc
    assert (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8") in json_doc
    # sub-packages are part of their package's document
    assert (STDLIB / "email" / "mime" / "text.py").read_text(encoding="utf-8") in email_doc
    assert bisect_doc == (STDLIB / "bisect.py").read_text(encoding="utf-8")
    headers = [line for line in json_doc.splitlines() if line.startswith("# file: ")]
    assert headers == sorted(headers)


def test_stdlib_splits_packages_above_the_size_limit():
    documents = list(StdlibCorpus(["email"], max_document_bytes=40_000))
    names = [d.name for d in documents]
    assert "email/mime" in names and "email[1]" in names and "email[2]" in names
    text = "".join(d.text for d in documents)
    for path in sorted((STDLIB / "email").rglob("*.py")):
        content = path.read_text(encoding="utf-8")
        if content.strip():
            assert text.count(f"# file: {path.relative_to(STDLIB).as_posix()}\n") == 1
            assert content in text


def test_stdlib_skips_undecodable_files_and_site_packages(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "good.py").write_text("x = 'caf\u00e9'\n")
    (tmp_path / "pkg" / "latin1.py").write_bytes("y = 'caf\u00e9'\n".encode("latin-1"))
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "installed.py").write_text("z = 1\n")
    (tmp_path / "mod.py").write_text("def f():\n    return 1\n")
    documents = {d.name: d.text for d in StdlibCorpus(root=tmp_path)}
    assert documents == {
        "mod": "def f():\n    return 1\n",
        "pkg": "# file: pkg/good.py\nx = 'caf\u00e9'\n",
    }


def test_stdlib_unknown_package_is_a_value_error():
    with pytest.raises(ValueError, match="no_such_package"):
        StdlibCorpus(["no_such_package"])


def test_folder_reader_per_file_and_per_directory(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / "sub" / "c.md").write_text("gamma")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("hidden\n")
    per_file = {d.name: d.text for d in FolderCorpus(tmp_path, extensions=["txt", ".md"])}
    assert per_file == {"a.txt": "alpha\n", "sub/b.md": "beta\n", "sub/c.md": "gamma"}
    per_dir = {d.name: d.text for d in FolderCorpus(tmp_path, group_by_directory=True)}
    assert per_dir == {
        ".": "# file: a.txt\nalpha\n",
        "sub": "# file: sub/b.md\nbeta\n\n# file: sub/c.md\ngamma\n",
    }
    only_md = [d.name for d in FolderCorpus(tmp_path, extensions=[".md"])]
    assert only_md == ["sub/b.md", "sub/c.md"]


@pytest.mark.parametrize("content", [None, b"", b"\xff\xfe\x00binary"])
def test_folder_without_text_is_a_value_error_naming_it(tmp_path, content):
    if content is not None:
        (tmp_path / "f.txt").write_bytes(content)
    with pytest.raises(ValueError, match=f"{tmp_path}.*no usable text.*\\.txt"):
        list(FolderCorpus(tmp_path))


def test_jsonl_reader(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "first doc", "id": 1}, {"text": ""}, {"text": "second\ndoc"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert [d.text for d in JsonlCorpus(path)] == ["first doc", "second\ndoc"]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"content": "body"}) + "\n")
    assert [d.text for d in JsonlCorpus(other, field="content")] == ["body"]


@pytest.mark.parametrize(
    "lines", [[], [{"content": "no text field"}], [{"text": ""}], ["a string, not an object"]]
)
def test_jsonl_without_text_is_a_value_error_naming_it(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=f"{path}.*'text'"):
        list(JsonlCorpus(path))


def test_open_corpus_dispatch_and_errors(tmp_path):
    assert isinstance(open_corpus("stdlib", packages=["json"]), StdlibCorpus)
    assert isinstance(open_corpus(tmp_path), FolderCorpus)
    (tmp_path / "x.jsonl").write_text('{"text": "t"}\n')
    assert isinstance(open_corpus(tmp_path / "x.jsonl"), JsonlCorpus)
    with pytest.raises(ValueError, match="missing"):
        open_corpus(tmp_path / "missing")
