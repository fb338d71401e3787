"""Held-out loss: equal to a hand computation, windows inside documents covering the same
tokens at every length, and clear errors when the text is too short."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_nsa.evaluation import heldout_loss, loss_windows, tokenize_documents


@torch.no_grad()
def test_loss_equals_a_hand_computation(random_model, tokenizer, heldout_texts):
    documents = tokenize_documents(tokenizer, heldout_texts)
    length, budget = 64, 5 * 64 + 10
    result = heldout_loss(random_model, documents, length, budget, batch_size=2)
    total, count, quarters = 0.0, 0, [[] for _ in range(4)]
    for w in range(5):  # one document: windows are its first five 64-token slices
        ids = documents[0][w * length : (w + 1) * length]
        logits = random_model(torch.tensor([ids]), use_cache=False).logits[0].double()
        for t in range(length - 1):
            nll = -(logits[t] - torch.logsumexp(logits[t], dim=0))[ids[t + 1]].item()
            total, count = total + nll, count + 1
            quarters[t * 4 // (length - 1)].append(nll)
    assert len(documents) == 1
    assert (result.windows, result.tokens) == (5, count)
    assert math.isclose(result.loss, total / count, rel_tol=1e-5)
    for got, values in zip(result.quarters, quarters, strict=True):
        assert math.isclose(got, sum(values) / len(values), rel_tol=1e-5)


def test_every_length_covers_the_same_tokens():
    documents = [list(range(100)), list(range(1000, 1040)), list(range(2000, 2003))]
    by_length = {n: loss_windows(documents, n, 64) for n in (8, 16, 32)}
    covered = {n: sorted(t for w in windows for t in w) for n, windows in by_length.items()}
    assert covered[8] == covered[16] == covered[32]
    assert by_length[32] == [list(range(32)), list(range(1000, 1032))]
    assert by_length[16][:3] == [list(range(16)), list(range(1000, 1016)), list(range(16, 32))]


def test_too_little_text_is_refused():
    with pytest.raises(ValueError, match="hold 1 windows of 32 tokens; tokens=64 needs 2"):
        loss_windows([list(range(40))], 32, 64)
    with pytest.raises(ValueError, match="below one window"):
        loss_windows([list(range(40))], 32, 16)
    with pytest.raises(ValueError, match="length=1"):
        loss_windows([list(range(40))], 1, 16)
