"""Context parallelism over eight CPU processes (gloo): the tiny "LG" model at CP=8 equals one
rank, per-token losses and every gradient, and sends what the formulas say.

T = 96 splits into 16 chunks of 6 tokens: shorter than the window's halo (15, taken from
three chunks) and than a compression block (8, whose l - 1 = 7 token halo spans two chunks),
so every rank exchanges with several others. About a minute on two cores.
"""

from __future__ import annotations

import pytest
from cpu_support import run_checks
from test_context_parallel import ASA, check_bytes, compare


def cp8_local_and_global_layers(rank, world_size):
    compare(ASA, cp=8)
    check_bytes(cp=8)


EIGHT_RANKS = [cp8_local_and_global_layers]


@pytest.fixture(scope="module")
def eight_rank_results(tmp_path_factory):
    return run_checks(
        EIGHT_RANKS, 8, str(tmp_path_factory.mktemp("cp8") / "results.pt"), timeout=600
    )


@pytest.mark.parametrize("check", [check.__name__ for check in EIGHT_RANKS])
def test_eight_ranks(eight_rank_results, check):
    assert eight_rank_results[check] is None, eight_rank_results[check]
