"""Megatron GPTDataset train/valid splits over an indexed dataset (or mock data), and document
boundaries of packed samples as `cu_seqlens` for attention that must not cross documents.

GPTDataset packs documents back to back across sample boundaries, so a sample of 64k+ tokens
usually spans several documents; each document ends with the EOD token, which is all that is
needed to recover the boundaries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase
from torch.utils.data import Dataset


def cu_seqlens_from_tokens(tokens: torch.Tensor | np.ndarray, eod: int) -> torch.Tensor:
    """Offsets (int32) of the documents in `tokens`: a document ends after each EOD token.

    `tokens` is one sample `[T]` or a batch `[B, T]`; for a batch the offsets index the
    flattened `B*T` tokens, each row ending a document too (the varlen layout that kernels
    taking `cu_seqlens` expect). Starts at 0, ends at the token count, no empty documents;
    stays on the device of `tokens`.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [T] or [B, T], got shape {tuple(tokens.shape)}")
    rows, length = tokens.shape
    after_eod = torch.nonzero(tokens == eod)
    ends = after_eod[:, 0] * length + after_eod[:, 1] + 1
    row_ends = torch.arange(rows + 1, device=tokens.device) * length
    return torch.unique(torch.cat([row_ends, ends])).to(torch.int32)


class WithDocumentBoundaries(Dataset):
    """A GPT dataset whose samples also carry `cu_seqlens` (int32, variable length) and
    `max_seqlen` of their input tokens. Batch them with `collate_packed`."""

    def __init__(self, dataset: GPTDataset, eod: int) -> None:
        self.dataset = dataset
        self.eod = eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = dict(self.dataset[idx])
        cu_seqlens = cu_seqlens_from_tokens(sample["tokens"], self.eod)
        sample["cu_seqlens"] = cu_seqlens
        sample["max_seqlen"] = torch.tensor(int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
        return sample


def collate_packed(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into `[B, T]` tensors; `cu_seqlens` become the offsets over the flattened
    `B*T` tokens and `max_seqlen` the batch maximum."""
    batch = {
        key: torch.stack([sample[key] for sample in samples])
        for key in samples[0]
        if key not in ("cu_seqlens", "max_seqlen")
    }
    length = samples[0]["tokens"].numel()
    ends = [sample["cu_seqlens"][1:] + i * length for i, sample in enumerate(samples)]
    batch["cu_seqlens"] = torch.cat([samples[0]["cu_seqlens"][:1], *ends])
    batch["max_seqlen"] = torch.stack([s["max_seqlen"] for s in samples]).max()
    return batch


def _ensure_helpers() -> None:
    """GPTDataset's sample index needs Megatron's C++ helpers: the wheels ship them compiled;
    a source checkout of Megatron compiles them here once (make + g++)."""
    try:
        from megatron.core.datasets import helpers  # noqa: F401
    except ImportError:
        from megatron.core.datasets.utils import compile_helpers

        compile_helpers()


def _check_split(prefix: str, split: str) -> None:
    """Fail clearly where Megatron would loop forever: a split that gets no documents."""
    documents = len(IndexedDataset(prefix))
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(("train", "valid"), matrix[:2], strict=True):
        if bounds is None:
            continue
        count = round(bounds[1] * documents) - round(bounds[0] * documents)
        if count == 0:
            raise ValueError(
                f"{prefix}: the {name} split of {split!r} gets none of its {documents} documents"
            )


def build_gpt_datasets(
    prefix: str | os.PathLike | None,
    tokenizer: MegatronTokenizerBase,
    seq_length: int,
    *,
    split: str = "98,2,0",
    train_samples: int | None = None,
    valid_samples: int | None = None,
    seed: int = 1234,
    cache_dir: str | os.PathLike | None = None,
    document_boundaries: bool = False,
    reset_position_ids: bool | None = None,
    eod_mask_loss: bool | None = None,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[Dataset | None, Dataset | None]:
    """Train and valid datasets of `seq_length`-token samples (`tokens`, `labels`,
    `loss_mask`, `position_ids`), documents packed across sample boundaries.

    `prefix` is the indexed dataset (`<dir>/<name>_text_document`), or None for Megatron's
    MockGPTDataset (which always splits its synthetic documents evenly). `split` divides the
    documents (Megatron's "train,valid,test" weights).
    `*_samples` of None means one epoch. The index cache goes to `cache_dir` (default: `cache/`
    next to the data). No dense attention mask is built (it would be T^2). With
    `document_boundaries`, samples also carry `cu_seqlens` and `max_seqlen` (see
    `WithDocumentBoundaries`), and position ids restart and the loss skips EOD inputs unless
    `reset_position_ids` / `eod_mask_loss` say otherwise. A dataset is None on ranks where
    `is_built_on_rank()` is false (under torch.distributed).
    """
    _ensure_helpers()
    boundaries = document_boundaries
    config = dict(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        reset_position_ids=boundaries if reset_position_ids is None else reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=boundaries if eod_mask_loss is None else eod_mask_loss,
        create_attention_mask=False,
    )
    if prefix is None:
        dataset_class = MockGPTDataset
    else:
        prefix = str(prefix)
        if not IndexedDataset.exists(prefix):
            raise ValueError(f"{prefix}: no indexed dataset (looked for {prefix}.bin and .idx)")
        _check_split(prefix, split)
        dataset_class = GPTDataset
        cache = Path(cache_dir) if cache_dir is not None else Path(prefix).parent / "cache"
        config.update(blend=([prefix], None), split=split, path_to_cache=str(cache))
    builder = BlendedMegatronDatasetBuilder(
        dataset_class,
        [train_samples, valid_samples, None],
        is_built_on_rank,
        GPTDatasetConfig(**config),
    )
    train, valid, _ = builder.build()
    if document_boundaries:
        train, valid = (
            None if d is None else WithDocumentBoundaries(d, tokenizer.eod) for d in (train, valid)
        )
    return train, valid
