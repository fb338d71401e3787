"""Long-context quality of any Hugging Face causal LM: held-out loss at several lengths,
passkey retrieval built from real code, and decode-cache bytes per token.

- `prepare_quality_data`: a training set with passkey documents mixed in, and held-out
  stdlib packages (`python -m megatron_nsa.evaluation.prepare`).
- `evaluate_model` / `evaluate_folder`: the scores of a model (`megatron-nsa evaluate`).
- `heldout_loss`, `PasskeyTask`, `score_passkey`: the parts, for other corpora.

See docs/evaluation.md.
"""

from .data import HELDOUT_PACKAGES, PasskeyMixCorpus, prepare_quality_data, read_heldout
from .evaluate import EvalSettings, evaluate_folder, evaluate_model, write_json
from .heldout import LossResult, heldout_loss, loss_windows, tokenize_documents
from .models import kv_bytes_per_token, load_model
from .passkey import (
    PasskeyPrompt,
    PasskeyResult,
    PasskeyTask,
    build_prompt,
    greedy_generate,
    score_passkey,
    summarize,
    training_document,
)

__all__ = [
    "HELDOUT_PACKAGES",
    "EvalSettings",
    "LossResult",
    "PasskeyMixCorpus",
    "PasskeyPrompt",
    "PasskeyResult",
    "PasskeyTask",
    "build_prompt",
    "evaluate_folder",
    "evaluate_model",
    "greedy_generate",
    "heldout_loss",
    "kv_bytes_per_token",
    "load_model",
    "loss_windows",
    "prepare_quality_data",
    "read_heldout",
    "score_passkey",
    "summarize",
    "tokenize_documents",
    "training_document",
    "write_json",
]
