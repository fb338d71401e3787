"""The Megatron side of the Hugging Face tests, run on two CPU processes with gloo.

Each case builds a tiny ASA GPTModel at a parallel layout with its own random weights,
computes logits for one batch (longer than the window, several selection blocks), and
saves a checkpoint with `save_asa_checkpoint`. `load_and_compare` loads a checkpoint at
another layout and checks it gives the saved logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tiny_gpt import (
    batch,
    build_model,
    forward_backward,
    init_parallel,
    last_stage_output,
    tiny_config,
)

from megatron_nsa.checkpoint import load_asa_checkpoint, save_asa_checkpoint

CASES = {
    # The layers of the issue: "LG", l=8, s=4, l'=16, n=3, w=16, at TP=2.
    "tp2": dict(tp=2, overrides=dict(select_top_n=3)),
    # n=4 of 6 blocks (a real choice), low-rank queries and a SwiGLU MLP, at PP=2.
    "pp2": dict(pp=2, overrides=dict(q_lora_rank=24, gated_linear_unit=True,
                                     activation_func=F.silu)),
    # The baselines: dense GQA and three-branch NSA layers.
    "dn": dict(tp=2, overrides=dict(attention_pattern="DN", num_query_groups=2)),
    # One layer kind, so Megatron stacks the layers in the checkpoint; mean compression and
    # 4 queries per selection.
    "stacked": dict(tp=2, overrides=dict(attention_pattern="G", compressor="mean", num_layers=2,
                                         selection_query_block=4)),
}


def inputs() -> dict[str, torch.Tensor]:
    data = batch()
    return {"tokens": data["tokens"], "position_ids": data["position_ids"]}


def logits(chunks) -> torch.Tensor:
    return last_stage_output(forward_backward(chunks, inputs(), forward_only=True))


def _shared_folder(path: Path) -> Path:
    if torch.distributed.get_rank() == 0:
        path.mkdir()
    torch.distributed.barrier()
    return path


def save_cases(rank: int, world_size: int, out: str, tokenizer: str) -> None:
    root = Path(out)
    for seed, (case, spec) in enumerate(CASES.items()):
        config = tiny_config(tp=spec.get("tp", 1), pp=spec.get("pp", 1), **spec["overrides"])
        init_parallel(config, seed=seed + 1)
        chunks = build_model(config)
        result = logits(chunks)
        save_asa_checkpoint(chunks[0], _shared_folder(root / case), tokenizer=tokenizer)
        if rank == 0:
            torch.save(result, root / f"{case}.logits.pt")
    if rank == 0:
        torch.save(inputs()["tokens"], root / "tokens.pt")


def load_and_compare(
    rank: int, world_size: int, case: str, checkpoint: str, expected: str, tp: int, pp: int
) -> None:
    """Load `checkpoint` into the case's model at TP=tp, PP=pp: the `expected` logits."""
    config = tiny_config(tp=tp, pp=pp, **CASES[case]["overrides"])
    init_parallel(config, seed=99)
    chunks = build_model(config)
    load_asa_checkpoint(chunks[0], checkpoint)
    torch.testing.assert_close(logits(chunks), torch.load(expected), atol=1e-5, rtol=1e-5)
