"""The distribution ships every package folder under its import name."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"kernels": "nsa_kernels", "megatron_nsa": "megatron_nsa"}


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {name: folder for folder, name in IMPORT_NAMES.items()}
    found = set()
    for folder, name in IMPORT_NAMES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    assert found == set(config["packages"])


def test_kernels_do_not_import_megatron():
    for path in (ROOT / "kernels").rglob("*.py"):
        assert "megatron" not in path.read_text(), f"{path} imports Megatron"
