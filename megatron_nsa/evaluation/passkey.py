"""Passkey retrieval in real code: a key hidden at a chosen depth, asked for at the end.

A prompt is real source code with one extra line, the needle, at depth d (the share of the
haystack before it), and ends with a question the model completes:

    ...haystack lines...
    PASSKEY = "48213"
    ...haystack lines...
    # PASSKEY as defined above
    PASSKEY = "

Every prompt is exactly `length` tokens of the scored model's own tokenizer, so prompts of
one length batch without padding. Scoring is greedy decoding of as many tokens as the key
takes after the prompt, and an exact match of those token ids. Training documents use the
same format with the answer appended (`training_document`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import model_device

NAME = "PASSKEY"
DIGITS = 5
QUESTION = f'# {NAME} as defined above\n{NAME} = "'
HAYSTACK_SLACK = 64
"""Extra haystack tokens taken beyond the prompt length, trimmed from the front afterwards."""
MAX_TRIES = 4


def random_key(rng: random.Random, digits: int = DIGITS) -> str:
    """A decimal key of `digits` digits without a leading zero."""
    if digits < 1:
        raise ValueError(f"digits={digits} must be >= 1")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def needle(key: str) -> str:
    return f'{NAME} = "{key}"\n'


def training_document(lines: Sequence[str], key: str, depth: float) -> str:
    """Haystack `lines` (each ending in a newline) with the needle at `depth`, then the
    question and its answer: what a model must see in training to learn the task."""
    at = round(depth * len(lines))
    body = "".join(lines[:at]) + needle(key) + "".join(lines[at:])
    if not body.endswith("\n"):
        body += "\n"
    return f'{body}{QUESTION}{key}"\n'


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: `input_ids` (exactly `length` tokens), the key's token ids as the
    tokenizer writes them after the prompt, and where the needle landed."""

    input_ids: list[int]
    answer_ids: list[int]
    key: str
    length: int
    depth: float
    sample: int
    needle_position: int
    """Index of the needle's first token in `input_ids`."""


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def special_prefix(tokenizer) -> list[int]:
    """The BOS token when the tokenizer adds one to every text, else nothing."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if getattr(tokenizer, "add_bos_token", False) and bos is not None else []


def _line_start_at_or_after(text: str, char: int) -> int:
    if char <= 0 or text[char - 1] == "\n":
        return max(char, 0)
    newline = text.find("\n", char)
    return len(text) if newline < 0 else newline + 1


def _nearest_line_start(text: str, char: int) -> int:
    before = text.rfind("\n", 0, char) + 1
    after = _line_start_at_or_after(text, char)
    return before if char - before <= after - char else after


def _first_token_at(offsets: list[tuple[int, int]], char: int) -> int:
    return next((i for i, (start, _) in enumerate(offsets) if start >= char), len(offsets))


def build_prompt(
    tokenizer, haystack: str, key: str, length: int, depth: float, sample: int = 0
) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens from `haystack` (text starting at a line start,
    longer than the prompt), with the needle on its own line at `depth` in [0, 1].

    The text is tokenized whole (as the model would read a file); tokens beyond `length`
    are trimmed from the front of the haystack, never from the needle.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    prefix = special_prefix(tokenizer)
    budget = length - len(prefix)
    needle_text = needle(key)
    question = len(_encode(tokenizer, QUESTION)[0])
    overhead = len(_encode(tokenizer, needle_text)[0]) + question
    if budget <= overhead:
        raise ValueError(f"length={length} leaves no room for a haystack ({overhead} tokens)")
    hay_ids, hay_offsets = _encode(tokenizer, haystack)
    want = budget + HAYSTACK_SLACK
    if len(hay_ids) <= want:
        raise ValueError(
            f"haystack of {len(hay_ids)} tokens is too short for a prompt of length={length}"
        )
    hay = haystack[: _line_start_at_or_after(haystack, hay_offsets[want][0])]
    ids, offsets = _encode(tokenizer, hay + QUESTION)
    excess = len(ids) + overhead - question - budget
    target = excess + round(depth * (len(ids) - question - excess))
    char = offsets[target][0] if target < len(ids) - question else len(hay)
    place = _nearest_line_start
    for _ in range(MAX_TRIES):
        cut = place(hay, min(char, len(hay)))
        text = hay[:cut] + needle_text + hay[cut:] + QUESTION
        ids, offsets = _encode(tokenizer, text)
        excess, at = len(ids) - budget, _first_token_at(offsets, cut)
        if excess < 0:
            raise ValueError(f"haystack too short for a prompt of length={length}")
        if at >= excess:
            break
        char, place = offsets[excess][0], _line_start_at_or_after  # move it past the trim
    else:
        raise ValueError(f"could not place the needle at depth={depth} in length={length}")
    full = _encode(tokenizer, text + key)[0]
    if full[: len(ids)] != ids:
        raise ValueError(
            "the tokenizer merges the key with the prompt's last token; exact-match scoring "
            "needs the key to start a new token"
        )
    return PasskeyPrompt(
        input_ids=prefix + ids[excess:],
        answer_ids=full[len(ids):],
        key=key,
        length=length,
        depth=depth,
        sample=sample,
        needle_position=len(prefix) + at - excess,
    )


class PasskeyTask:
    """Prompts for a grid of lengths x depths x samples from held-out texts, seeded.

    Sample s of length L has one key and one haystack start (a random line of the joined
    `texts`) shared by every depth, so depths compare on the same code and key.
    """

    def __init__(self, tokenizer, texts: Sequence[str], *, seed: int = 0,
                 digits: int = DIGITS) -> None:
        if not texts:
            raise ValueError("texts must hold at least one held-out document")
        self.tokenizer, self.seed, self.digits = tokenizer, seed, digits
        self.source = "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)
        ids, self.offsets = _encode(tokenizer, self.source)
        self.tokens = len(ids)

    def haystack(self, length: int, rng: random.Random) -> str:
        """Text from a random line start with room for `length` tokens and some spare."""
        need = 2 * length + 4 * HAYSTACK_SLACK  # joins may shorten the text a little
        if self.tokens <= need:
            raise ValueError(
                f"held-out texts hold {self.tokens} tokens; length={length} needs more than "
                f"{need}"
            )
        start = rng.randrange(self.tokens - need)
        char = _line_start_at_or_after(self.source, self.offsets[start][0])
        return self.source[char : self.offsets[start + need][1]]

    def prompts(self, lengths: Sequence[int], depths: Sequence[float],
                samples: int) -> list[PasskeyPrompt]:
        check_grid(lengths, depths, samples)
        out = []
        for length in lengths:
            for sample in range(samples):
                rng = random.Random(f"{self.seed}:{length}:{sample}")
                key = random_key(rng, self.digits)
                haystack = self.haystack(length, rng)
                out.extend(
                    build_prompt(self.tokenizer, haystack, key, length, depth, sample)
                    for depth in depths
                )
        return out


def check_grid(lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths={list(lengths)} must be positive integers")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths={list(depths)} must be numbers in [0, 1]")
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation [B, max_new_tokens] of `input_ids` [B, T] (rows of one length):
    one forward over the prompt, then one token at a time from the model's cache. Works
    with any Hugging Face causal LM (`past_key_values`, `use_cache`)."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        out = model(
            input_ids=tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True
        )
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


@dataclass(frozen=True)
class PasskeyResult:
    length: int
    depth: float
    sample: int
    key: str
    generated_ids: list[int]
    correct: bool


def score_passkey(model, prompts: Sequence[PasskeyPrompt], *,
                  batch_size: int = 1) -> list[PasskeyResult]:
    """Greedy-decode every prompt (in batches of one length) and compare token ids."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = model_device(model)
    results = []
    by_length: dict[int, list[PasskeyPrompt]] = {}
    for prompt in prompts:
        by_length.setdefault(len(prompt.input_ids), []).append(prompt)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            steps = max(len(p.answer_ids) for p in batch)
            ids = torch.tensor([p.input_ids for p in batch], device=device)
            generated = greedy_generate(model, ids, steps).tolist()
            for prompt, row in zip(batch, generated, strict=True):
                row = row[: len(prompt.answer_ids)]
                results.append(PasskeyResult(
                    prompt.length, prompt.depth, prompt.sample, prompt.key, row,
                    row == prompt.answer_ids,
                ))
    return results


def summarize(results: Sequence[PasskeyResult]) -> dict:
    """Accuracy per (length, depth) cell and per length."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for r in results:
        cells.setdefault((r.length, r.depth), []).append(r.correct)
    by_length: dict[int, list[bool]] = {}
    for (length, _), hits in cells.items():
        by_length.setdefault(length, []).extend(hits)
    return {
        "cells": [
            {"length": length, "depth": depth, "samples": len(hits), "correct": sum(hits),
             "accuracy": sum(hits) / len(hits)}
            for (length, depth), hits in sorted(cells.items())
        ],
        "by_length": {
            str(length): sum(hits) / len(hits) for length, hits in sorted(by_length.items())
        },
    }
