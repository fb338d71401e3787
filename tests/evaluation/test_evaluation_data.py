"""The training corpus of a quality comparison: held-out packages (and their tests) left out,
passkey documents mixed in at about the asked share, the same documents on every pass."""

from __future__ import annotations

import pytest

from megatron_nsa.data import Document
from megatron_nsa.evaluation import PasskeyMixCorpus, prepare_quality_data
from megatron_nsa.evaluation.data import held_out
from megatron_nsa.evaluation.passkey import QUESTION


class ListCorpus:
    name = "synthetic"

    def __init__(self, documents: list[Document]) -> None:
        self.documents = documents

    def __iter__(self):
        return iter(self.documents)


def code(seed: int, lines: int) -> str:
    return "".join(f"value_{seed}_{i} = compute({i}, {seed})\n" for i in range(lines))


def test_held_out_packages_and_their_tests():
    packages = ["email", "asyncio"]
    assert held_out("email", packages) and held_out("email/mime", packages)
    assert held_out("asyncio[2]", packages) and held_out("test/test_email", packages)
    assert held_out("test/test_asyncio/utils", packages)
    assert not held_out("test[3]", packages) and not held_out("emailx", packages)
    assert not held_out("json", packages)


def test_mix_is_deterministic_and_near_the_asked_share():
    base = ListCorpus(
        [Document(f"pkg{i}", code(i, 3000)) for i in range(20)]
        + [Document("email/mime", code(99, 100))]
    )
    corpus = PasskeyMixCorpus(
        base, exclude=lambda name: held_out(name, ["email"]), fraction=0.2,
        min_tokens=64, max_tokens=1024, seed=5,
    )
    first, second = list(corpus), list(corpus)
    assert first == second
    assert not any(d.name.startswith("email") for d in first)
    passkey = [d for d in first if "#passkey" in d.name]
    share = sum(len(d.text) for d in passkey) / sum(len(d.text) for d in first)
    assert 0.12 < share < 0.28, share
    for document in passkey:
        key = document.text.rsplit(QUESTION, 1)[1][:5]
        assert document.text.endswith(f'{QUESTION}{key}"\n')
        assert f'PASSKEY = "{key}"\n' in document.text
        assert document.name.split("#")[0] in {d.name for d in base.documents}
    none = PasskeyMixCorpus(base, fraction=0.0)
    assert [d.name for d in none] == [d.name for d in base.documents]


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fraction=1.0"):
        PasskeyMixCorpus(ListCorpus([]), fraction=1.0)
    with pytest.raises(ValueError, match="share \\['json'\\]"):
        prepare_quality_data(tmp_path / "out", packages=["json"], heldout=["json"])
    with pytest.raises(ValueError, match="no stdlib package or module named"):
        prepare_quality_data(tmp_path / "out", packages=["json"], heldout=["no_such_package"])
    assert not (tmp_path / "out").exists()
