"""Shared fixtures: a tiny prepared corpus (two stdlib packages, a 512-token BPE) built once."""

import pytest

from megatron_nsa.data import StdlibCorpus, load_tokenizer, prepare_dataset

PACKAGES = ["json", "email"]
VOCAB_SIZE = 512


@pytest.fixture(scope="session")
def packages():
    return PACKAGES


@pytest.fixture(scope="session")
def vocab_size():
    return VOCAB_SIZE


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """(output folder, summary) of `prepare_dataset` on the json and email packages."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    summary = prepare_dataset(StdlibCorpus(PACKAGES), out, vocab_size=VOCAB_SIZE, progress=None)
    return out, summary


@pytest.fixture(scope="session")
def tokenizer(prepared):
    out, summary = prepared
    return load_tokenizer(out / summary["tokenizer"])
