"""Held-out language-modelling loss at several context lengths.

Windows of L tokens are cut from held-out documents (never across two of them), taken in
turn from each document, front to back. With the same token budget at every length the
windows of each length cover the same tokens (the first budget / D tokens of each of the D
documents), so the losses of two lengths differ only in how much context each token had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import model_device

QUARTERS = 4


def tokenize_documents(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def loss_windows(documents: Sequence[Sequence[int]], length: int, tokens: int) -> list[list[int]]:
    """`tokens // length` windows of `length` tokens: window j is the (j // D)-th window of
    document j % D among the D documents long enough; raises when there are too few."""
    if length < 2:
        raise ValueError(f"length={length} must be >= 2 (a window predicts length - 1 tokens)")
    count = tokens // length
    if count < 1:
        raise ValueError(f"tokens={tokens} is below one window of length={length}")
    per_document = [
        [list(doc[i : i + length]) for i in range(0, len(doc) - length + 1, length)]
        for doc in documents
    ]
    per_document = [windows for windows in per_document if windows]
    windows = []
    for turn in range(max((len(w) for w in per_document), default=0)):
        windows.extend(w[turn] for w in per_document if turn < len(w))
    if len(windows) < count:
        raise ValueError(
            f"held-out documents hold {len(windows)} windows of {length} tokens; "
            f"tokens={tokens} needs {count}"
        )
    return windows[:count]


@dataclass(frozen=True)
class LossResult:
    """Mean next-token loss (nats) over `tokens` predictions in `windows` windows, and the
    mean over each quarter of the window positions (later quarters had more context)."""

    length: int
    loss: float
    tokens: int
    windows: int
    quarters: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"loss": self.loss, "tokens": self.tokens, "windows": self.windows,
                "quarters": list(self.quarters)}


@torch.no_grad()
def window_losses(model, windows: Sequence[Sequence[int]], batch_size: int = 1) -> torch.Tensor:
    """Per-position next-token losses [windows, length - 1] (float64) of a causal LM."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    device = model_device(model)
    rows = []
    for i in range(0, len(windows), batch_size):
        ids = torch.tensor(windows[i : i + batch_size], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
        )
        rows.append(loss.view(ids.shape[0], -1).double().cpu())
    return torch.cat(rows)


def heldout_loss(model, documents: Sequence[Sequence[int]], length: int, tokens: int,
                 batch_size: int = 1) -> LossResult:
    """Loss over `tokens // length` windows of `length` tokens (see `loss_windows`)."""
    windows = loss_windows(documents, length, tokens)
    losses = window_losses(model, windows, batch_size)  # [W, length - 1]
    quarters = torch.tensor_split(losses, QUARTERS, dim=1)
    return LossResult(
        length=length,
        loss=float(losses.mean()),
        tokens=losses.numel(),
        windows=len(windows),
        quarters=tuple(float(q.mean()) for q in quarters),
    )
