"""The distribution ships every package folder under its import name."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nsa_kernels", "megatron_nsa")


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in config  # each folder is named as it is imported
    found = set()
    for name in PACKAGES:
        for init in (ROOT / name).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    assert found == set(config["packages"])


def test_no_top_level_folder_shadows_an_installed_package():
    """A package folder at the root is importable from the working directory, ahead of
    site-packages: none may take the name of another distribution (`kernels` is one that
    transformers imports)."""
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(PACKAGES)


def test_kernels_do_not_import_megatron():
    for path in (ROOT / "nsa_kernels").rglob("*.py"):
        assert "megatron" not in path.read_text(), f"{path} imports Megatron"
