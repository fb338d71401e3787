"""Passkey retrieval: prompts are exactly the asked length with the needle where asked, an
oracle that copies scores 100%, a random-init model ~0%, and the greedy decoding loop
agrees with transformers' generate()."""

from __future__ import annotations

import pytest
import torch

from megatron_nsa.evaluation import (
    PasskeyTask,
    build_prompt,
    greedy_generate,
    score_passkey,
    summarize,
    training_document,
)
from megatron_nsa.evaluation.passkey import QUESTION, needle

LENGTHS = (256, 512)
DEPTHS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def prompts(tokenizer, heldout_texts):
    return PasskeyTask(tokenizer, heldout_texts, seed=3).prompts(LENGTHS, DEPTHS, samples=3)


def test_prompts_are_exact_length_with_the_needle_at_depth(tokenizer, prompts):
    assert len(prompts) == len(LENGTHS) * len(DEPTHS) * 3
    for p in prompts:
        text = tokenizer.decode(p.input_ids)
        assert len(p.input_ids) == p.length
        assert tokenizer.decode(p.input_ids[p.needle_position :]).startswith(needle(p.key))
        assert text.endswith(QUESTION)
        assert text.count(f'"{p.key}"') == 1
        assert tokenizer.decode(p.answer_ids) == p.key
        question, needle_ids = (len(tokenizer(t)["input_ids"]) for t in (QUESTION, needle(p.key)))
        haystack = p.length - question - needle_ids
        assert abs(p.needle_position - p.depth * haystack) < 0.15 * p.length, p
    keys = {(p.length, p.sample): p.key for p in prompts}
    assert len(set(keys.values())) == len(keys)  # a key per sample, shared by its depths


def test_prompts_are_seeded(tokenizer, heldout_texts, prompts):
    same = PasskeyTask(tokenizer, heldout_texts, seed=3).prompts(LENGTHS, DEPTHS, samples=3)
    other = PasskeyTask(tokenizer, heldout_texts, seed=4).prompts(LENGTHS, DEPTHS, samples=3)
    assert same == prompts
    assert [p.key for p in other] != [p.key for p in prompts]


def test_an_oracle_that_copies_scores_everything(copy_model, prompts):
    results = score_passkey(copy_model, prompts, batch_size=4)
    summary = summarize(results)
    assert all(result.correct for result in results)
    assert [cell["accuracy"] for cell in summary["cells"]] == [1.0] * len(LENGTHS) * len(DEPTHS)
    assert summary["by_length"] == {str(n): 1.0 for n in LENGTHS}


def test_a_random_model_scores_about_nothing(random_model, prompts):
    summary = summarize(score_passkey(random_model, prompts, batch_size=3))
    assert sum(cell["correct"] for cell in summary["cells"]) <= 1, summary
    assert all(cell["samples"] == 3 for cell in summary["cells"])


@torch.no_grad()
def test_greedy_decoding_equals_generate(random_model, prompts):
    ids = torch.tensor([p.input_ids for p in prompts[:2]])
    ours = greedy_generate(random_model, ids, 5)
    theirs = random_model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(ours, theirs[:, ids.shape[1] :])


def test_training_document_puts_the_needle_at_depth():
    lines = [f"x{i} = {i}\n" for i in range(10)]
    text = training_document(lines, "12345", 0.3)
    body = text.splitlines(keepends=True)
    assert body[3] == needle("12345")
    assert text.endswith(QUESTION + '12345"\n')


def test_bad_input_is_refused(tokenizer, heldout_texts):
    haystack = heldout_texts[0]
    with pytest.raises(ValueError, match="depth=1.5"):
        build_prompt(tokenizer, haystack, "12345", 128, 1.5)
    with pytest.raises(ValueError, match="too short"):
        build_prompt(tokenizer, haystack[:200], "12345", 128, 0.5)
    task = PasskeyTask(tokenizer, heldout_texts)
    with pytest.raises(ValueError, match="samples=0"):
        task.prompts([256], [0.5], 0)
    with pytest.raises(ValueError, match="held-out texts hold"):
        task.prompts([10**6], [0.5], 1)
    with pytest.raises(ValueError, match="digits=0"):
        PasskeyTask(tokenizer, heldout_texts, digits=0).prompts([256], [0.5], 1)
