"""Pretrain a GPT model with Alternating Sparse Attention on Megatron-Core.

    torchrun --nproc-per-node 8 examples/pretrain_asa.py --preset 1.3b \\
        --data data/stdlib --tensor-model-parallel-size 2 --sequence-parallel \\
        --train-iters 10000 --save ckpt --save-interval 500
    python examples/pretrain_asa.py --preset tiny --mock-data --train-iters 20   # CPU

One process per GPU with NCCL, or CPU processes with gloo when CUDA is unavailable (then
megatron-core's CUDA calls get CPU stand-ins from examples/cpu_compat.py). Megatron's DDP,
distributed optimizer, warmup + cosine schedule and pipeline schedules; checkpoints are
`dist_checkpointing` folders that load at another TP/PP layout, with the `asa_config.json`
record that `megatron-nsa export-hf` reads; `--export-hf DIR` converts the final one.
Bad flags, data or checkpoints fail with one line before any process group is made (or,
with --prepare-stdlib, right after the corpus is prepared), never during training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tokenizers import MegatronTokenizerBase
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_nsa import ASATransformerConfig, get_asa_decoder_block_spec
from megatron_nsa.checkpoint import ASA_CONFIG_FILE, RECORD_FORMAT, TOKENIZER_DIR, config_record
from megatron_nsa.compat import use_foreach_multi_tensor_ops
from megatron_nsa.data import (
    MockTokenizer,
    build_gpt_datasets,
    collate_packed,
    load_tokenizer,
    open_corpus,
    prepare_dataset,
)
from nsa_kernels import flops

LATEST_FILE = "latest_checkpointed_iteration.txt"
MOCK_VOCAB_SIZE = 8192
MODEL_ARGS = dict(
    share_embeddings_and_output_weights=False,
    position_embedding_type="rope",  # the ASA layers apply RoPE themselves
)
"""GPTModel arguments besides the config; the checkpoint record repeats them."""
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}
"""The distributed optimizer's layout in checkpoints; megatron-core 0.16's default
(fully_sharded_model_space) makes tensors dist_checkpointing then rejects."""

PRESETS: dict[str, dict] = {
    "tiny": dict(
        num_layers=4, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4,
        num_query_groups=2, kv_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=16,
        v_head_dim=32, global_num_latent_heads=2, global_kv_lora_rank=32,
        sliding_window_size=64, compress_block_size=16, compress_stride=8,
        select_block_size=32, select_top_n=4, compress_mlp_hidden_size=64,
    ),
    "350m": dict(
        num_layers=24, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
        num_query_groups=4, kv_lora_rank=512, qk_head_dim=64, qk_pos_emb_head_dim=32,
        v_head_dim=64, global_num_latent_heads=2, global_kv_lora_rank=256,
        sliding_window_size=512, compress_block_size=32, compress_stride=16,
        select_block_size=64, select_top_n=16, selection_query_block=4,
    ),
    "30m": dict(
        num_layers=8, hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8,
        num_query_groups=2, kv_lora_rank=256, qk_head_dim=64, qk_pos_emb_head_dim=32,
        v_head_dim=64, global_num_latent_heads=2, global_kv_lora_rank=128,
        sliding_window_size=512, compress_block_size=32, compress_stride=16,
        select_block_size=64, select_top_n=16, selection_query_block=4,
        compress_mlp_hidden_size=64,
    ),
    "1.3b": dict(
        num_layers=24, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=16,
        num_query_groups=4, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
        v_head_dim=128, global_num_latent_heads=2, global_kv_lora_rank=512,
        sliding_window_size=512, compress_block_size=32, compress_stride=16,
        select_block_size=64, select_top_n=16, selection_query_block=4,
    ),
}
"""Architectures; the blocks of 350m / 1.3b are NSA's, with the ASA paper's 4-query reuse."""

RECOMPUTE_MODULES = ("core_attn", "mla_up_proj", "mlp")
"""Megatron's selective-recompute modules that apply to ASA's dense-MLP layers ("layernorm"
is left out: megatron-core 0.16 recomputes norms through Transformer Engine's FP8 state)."""

PRESET_TRAINING = {
    "tiny": dict(seq_length=512, lr=3e-3, lr_warmup_iters=2, mock_vocab_size=1024),
    "350m": dict(seq_length=8192, lr=3e-4, lr_warmup_iters=500, mock_vocab_size=MOCK_VOCAB_SIZE),
    "30m": dict(seq_length=8192, lr=1e-3, lr_warmup_iters=20, mock_vocab_size=MOCK_VOCAB_SIZE),
    "1.3b": dict(seq_length=8192, lr=2e-4, lr_warmup_iters=500, mock_vocab_size=MOCK_VOCAB_SIZE),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain_asa.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    model.add_argument("--pattern", default="LG", help="layer kinds over depth (L, G, D, N)")
    model.add_argument("--seq-length", type=int, help="tokens per sample (default: preset's)")
    model.add_argument("--recompute", choices=("full", "selective"), help="activation recompute")
    model.add_argument(
        "--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES,
        help="what --recompute selective recomputes (default: core_attn mla_up_proj); "
        "mlp keeps the attention and recomputes the MLPs",
    )
    model.add_argument(
        "--no-elementwise-fusion", action="store_true",
        help="run the norms and the attention layers' RoPE / concatenation glue unfused on "
        "the GPU",
    )
    model.add_argument(
        "--cross-entropy-loss-fusion", action="store_true",
        help="Megatron's fused cross-entropy on the GPU: ~4%% faster for ASA at 64k, but it "
        "holds a second fp32 copy of the logits (+8 GiB at 64k tokens, 32k vocabulary)",
    )

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--context-parallel-size", type=int, default=1)
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument(
        "--no-distributed-optimizer", action="store_true",
        help="Megatron's plain optimizer instead of the distributed one",
    )

    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="folder made by megatron_nsa.data.prepare")
    source.add_argument("--mock-data", action="store_true", help="Megatron's MockGPTDataset")
    data.add_argument(
        "--prepare-stdlib", action="store_true",
        help="first prepare the Python standard library into --data (unless already there)",
    )
    data.add_argument("--stdlib-packages", help="comma-separated stdlib packages to prepare")
    data.add_argument("--split", default="98,2,0", help="train,valid,test document weights")
    data.add_argument(
        "--document-mask", action="store_true",
        help="attention does not cross document boundaries (packed THD batches)",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--train-iters", type=int, default=20)
    train.add_argument("--micro-batch-size", type=int, default=1)
    train.add_argument(
        "--global-batch-size", type=int, help="default: micro batch size x data-parallel size"
    )
    train.add_argument("--lr", type=float, help="peak learning rate (default: preset's)")
    train.add_argument("--min-lr", type=float, help="end of the cosine (default: lr / 10)")
    train.add_argument("--lr-warmup-iters", type=int, help="default: preset's")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--clip-grad", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--fp32", action="store_true", help="fp32 on GPU too (CPU always is)")

    log = parser.add_argument_group("evaluation, checkpoints and logs")
    log.add_argument("--eval-interval", type=int, default=0, help="0: no evaluation")
    log.add_argument("--eval-iters", type=int, default=2)
    log.add_argument("--save", type=Path, help="checkpoint folder")
    log.add_argument("--save-interval", type=int, default=0, help="0: only at the end")
    log.add_argument("--load", type=Path, help="resume from this checkpoint folder")
    log.add_argument("--tensorboard", type=Path, help="TensorBoard log folder")
    log.add_argument("--log-file", type=Path, help="one JSON line of metrics per step")
    log.add_argument(
        "--log-interval", type=int, default=1,
        help="print every N steps (--log-file and TensorBoard get every step)",
    )
    log.add_argument(
        "--profile-dir", type=Path,
        help="profile --profile-steps with torch.profiler: a Chrome trace per rank and a table "
        "of the ops by GPU time (CPU time without a GPU) go here",
    )
    log.add_argument(
        "--profile-steps", type=int, nargs=2, default=(2, 3), metavar=("FIRST", "LAST"),
        help="the steps profiled, both included, counted from 1 over the whole training (a "
        "resumed run profiles those it takes; default: 2 3)",
    )
    log.add_argument(
        "--export-hf", type=Path,
        help="after the final save, convert it to a Hugging Face folder here (needs --save)",
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- setup


def init_distributed(args: argparse.Namespace) -> torch.device:
    """One process per GPU on NCCL, or CPU processes on gloo with the CUDA stand-ins."""
    if "RANK" not in os.environ:  # plain `python`: a world of one
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        from cpu_compat import install_cpu_standins

        install_cpu_standins()
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
    )
    return device


def check_args(args: argparse.Namespace) -> ASATransformerConfig:
    """Every check the flags and the process count allow, before any file is read or process
    group made; fills in the preset's sequence length and the global batch size."""
    args.seq_length = args.seq_length or PRESET_TRAINING[args.preset]["seq_length"]
    for flag in ("train_iters", "micro_batch_size", "log_interval"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    world = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1  # as init_distributed
    if world % (tp * pp * cp):
        raise ValueError(
            f"{world} process(es) cannot be split into TP x PP x CP = {tp} x {pp} x {cp}: start "
            f"a multiple of {tp * pp * cp} (torchrun --nproc-per-node)"
        )
    dp = world // (tp * pp * cp)
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    if global_batch % (args.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size {global_batch} must be a multiple of micro batch size x "
            f"data-parallel size = {args.micro_batch_size * dp}"
        )
    args.global_batch_size = global_batch
    if args.recompute_modules and args.recompute != "selective":
        raise ValueError(
            f"--recompute-modules {' '.join(args.recompute_modules)} needs --recompute selective "
            f"(got --recompute {args.recompute})"
        )
    config = build_config(args)
    check_seq_length(args, config)
    if args.export_hf is not None:
        check_export(args, config)
    if args.load is not None:
        find_checkpoint(args.load)
    if args.profile_dir is not None:
        first, last = args.profile_steps
        if not 1 <= first <= last <= args.train_iters:
            raise ValueError(
                f"--profile-steps {first} {last} must satisfy 1 <= FIRST <= LAST <= "
                f"--train-iters {args.train_iters}"
            )
    return config


def check_export(args: argparse.Namespace, config: ASATransformerConfig) -> None:
    """--export-hf converts the final checkpoint: it needs --save, a free output folder, the
    hf extra and a configuration the Hugging Face model can express."""
    if args.save is None:
        raise ValueError("--export-hf needs --save: it converts the checkpoint saved at the end")
    if args.export_hf.exists():
        raise ValueError(
            f"--export-hf {args.export_hf} already exists; remove it or name a new folder"
        )
    try:
        from megatron_nsa.hf.config_map import check_expressible
    except ImportError as error:
        raise ValueError(
            f"--export-hf needs the hf extra (pip install -e '.[hf]'): {error}"
        ) from None
    check_expressible(checkpoint_record(args, config, vocab_size=0), "--export-hf")


def build_config(args: argparse.Namespace) -> ASATransformerConfig:
    cuda = torch.cuda.is_available()
    bf16 = cuda and not args.fp32
    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute = {}
    if args.recompute == "full":
        recompute = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif args.recompute == "selective":
        modules = args.recompute_modules or ["core_attn", "mla_up_proj"]
        recompute = dict(recompute_granularity="selective", recompute_modules=list(modules))
    return ASATransformerConfig(
        **PRESETS[args.preset],
        attention_pattern=args.pattern,
        q_lora_rank=None,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        add_bias_linear=False,
        init_method_std=0.02,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        fuse_elementwise=not args.no_elementwise_fusion,
        cross_entropy_loss_fusion=cuda and args.cross_entropy_loss_fusion,
        **recompute,
    )


def checkpoint_record(
    args: argparse.Namespace, config: ASATransformerConfig, vocab_size: int
) -> dict:
    """The `asa_config.json` of this run's checkpoints: megatron_nsa's config record (what
    `megatron-nsa export-hf` reads) plus a "training" entry with what a resumed run must
    also agree on, the samples' length and document masking. As read back from JSON."""
    record = config_record(
        config, vocab_size=vocab_size, max_sequence_length=args.seq_length, **MODEL_ARGS
    )
    record["training"] = {"seq_length": args.seq_length, "document_mask": args.document_mask}
    return json.loads(json.dumps(record))


def check_seq_length(args: argparse.Namespace, config: ASATransformerConfig) -> None:
    """Fail before training on a length the CP chunks or the sequence-parallel split reject."""
    seq, cp, tp = args.seq_length, args.context_parallel_size, args.tensor_model_parallel_size
    if seq < 2:
        raise ValueError(f"--seq-length {seq} must be at least 2")
    if seq % (2 * cp):
        raise ValueError(
            f"--seq-length {seq} must be divisible by 2 x context-parallel size = {2 * cp} "
            "(each rank holds two of 2*CP chunks)"
        )
    query_block = config.selection_query_block
    if cp > 1 and set(args.pattern) & {"G", "N"} and (seq // (2 * cp)) % query_block:
        multiple = 2 * cp * config.selection_query_block
        raise ValueError(
            f"--seq-length {seq} must be divisible by {multiple}: the CP chunks must hold whole "
            f"query blocks (selection_query_block={config.selection_query_block})"
        )
    if cp > 1 and args.document_mask:
        raise ValueError("--document-mask with --context-parallel-size > 1 is not supported yet")
    local = seq // cp * (args.micro_batch_size if args.document_mask else 1)
    if args.sequence_parallel and local % tp:
        raise ValueError(
            f"--sequence-parallel splits each rank's {local} tokens over TP={tp} ranks: use a "
            f"--seq-length divisible by {2 * cp * tp}"
        )


def build_model(config: ASATransformerConfig, vocab_size: int, seq_length: int,
                distributed_optimizer: bool) -> list[DistributedDataParallel]:
    spec = get_asa_decoder_block_spec(config)
    model = GPTModel(
        config,
        spec,
        vocab_size,
        seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        **MODEL_ARGS,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
    )
    return [DistributedDataParallel(config, ddp, model)]


def unwrap(chunk: torch.nn.Module) -> GPTModel:
    while not isinstance(chunk, GPTModel):
        chunk = chunk.module
    return chunk


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Megatron's padding: the output layer splits evenly over TP and stays GEMM-friendly."""
    multiple = 128 * tp
    return math.ceil(vocab_size / multiple) * multiple


# ----------------------------------------------------------------------------- data


def find_dataset(folder: Path) -> str:
    """The indexed dataset prefix of a prepared folder; a clear error when it has no text."""
    if not folder.is_dir():
        raise ValueError(f"--data {folder}: no such folder")
    summary = folder / "summary.json"
    if summary.exists():
        prefixes = [folder / json.loads(summary.read_text())["dataset_prefix"]]
    else:
        prefixes = [p.with_suffix("") for p in sorted(folder.glob("*_text_document.idx"))]
    if len(prefixes) != 1 or not IndexedDataset.exists(str(prefixes[0])):
        raise ValueError(
            f"--data {folder}: no prepared dataset (expected one <name>_text_document.bin/.idx "
            "and tokenizer/). If it holds your text files (or pass a .jsonl file), prepare "
            f"them first: `python -m megatron_nsa.data.prepare --corpus {folder} --out "
            f"{folder}_prepared`, then pass --data {folder}_prepared; or pass --prepare-stdlib"
        )
    prefix = str(prefixes[0])
    dataset = IndexedDataset(prefix)  # its index memory map lives as long as this object
    tokens = int(dataset.sequence_lengths.sum())
    if tokens == 0:
        raise ValueError(f"--data {folder}: the dataset {prefix} holds no tokens")
    if not (folder / TOKENIZER_DIR / "tokenizer.json").exists():
        raise ValueError(f"--data {folder}: no tokenizer/ folder next to the dataset")
    return prefix


def open_data(args: argparse.Namespace) -> tuple[MegatronTokenizerBase, str | None, Path | None]:
    """(tokenizer, dataset prefix, tokenizer folder) of --data, or of --mock-data (no files)."""
    if args.mock_data:
        return MockTokenizer(PRESET_TRAINING[args.preset]["mock_vocab_size"]), None, None
    prefix = find_dataset(args.data)
    return load_tokenizer(args.data / TOKENIZER_DIR), prefix, args.data / TOKENIZER_DIR


def prepare_stdlib(args: argparse.Namespace) -> None:
    """Rank 0 prepares the stdlib corpus into --data unless a dataset is there already."""
    folder = args.data
    present = folder.is_dir() and any(folder.glob("*_text_document.idx"))
    if dist.get_rank() == 0 and not present:
        packages = args.stdlib_packages.split(",") if args.stdlib_packages else None
        prepare_dataset(open_corpus("stdlib", packages=packages), folder)
    dist.barrier()


class Batches:
    """The micro batches of each step for this data-parallel rank, from sample
    `step * global_batch_size` on, so that a resumed run reads what a straight run would.

    A step's batches are read on a background thread while the step before runs (on GPU,
    into pinned memory, so the copies to the device overlap too): reading and collating 64k
    tokens takes tens of milliseconds of host time that the GPU would otherwise wait for."""

    def __init__(self, dataset, args: argparse.Namespace, global_batch: int) -> None:
        self.dataset, self.args, self.global_batch = dataset, args, global_batch
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.per_rank = global_batch // parallel_state.get_data_parallel_world_size()
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self.ahead: tuple[int, Future] | None = None

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        if self.ahead is not None and self.ahead[0] == step:
            batches = self.ahead[1].result()
        else:
            batches = self.read(step)
        self.ahead = (step + 1, self.reader.submit(self.read, step + 1))
        return batches

    def read(self, step: int) -> list[dict[str, torch.Tensor]]:
        mbs = self.args.micro_batch_size
        first = step * self.global_batch + self.dp_rank * self.per_rank
        samples = [self.dataset[(first + i) % len(self.dataset)] for i in range(self.per_rank)]
        batches = [collate(samples[i : i + mbs], self.args) for i in range(0, self.per_rank, mbs)]
        if torch.cuda.is_available():
            batches = [{key: value.pin_memory() for key, value in b.items()} for b in batches]
        return batches


def collate(samples: list[dict], args: argparse.Namespace) -> dict[str, torch.Tensor]:
    if args.document_mask:
        batch = collate_packed(samples)
        batch = {
            key: value if key in ("cu_seqlens", "max_seqlen") else value.reshape(1, -1)
            for key, value in batch.items()
        }
    else:
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
    batch.pop("attention_mask", None)
    return batch


def model_inputs(
    batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[dict, PackedSeqParams | None]:
    """Move a micro batch to the device, cut out this CP rank's chunks, and describe packed
    documents to attention."""
    max_seqlen = batch.get("max_seqlen")  # read on the host: no device round trip
    batch = {
        key: value.to(device, non_blocking=True) for key, value in batch.items()
        if key != "max_seqlen"
    }
    packed = None
    if "cu_seqlens" in batch:
        cu_seqlens = batch.pop("cu_seqlens").to(torch.int32)
        max_seqlen = int(max_seqlen)
        packed = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
        )
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = cp_slice(batch)
    return batch, packed


def cp_slice(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron's zigzag split; megatron-core 0.19 added an `is_hybrid_cp` argument."""
    import inspect

    group = parallel_state.get_context_parallel_group()
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    return get_batch_on_this_cp_rank(batch, cp_group=group)


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(chunks: list[torch.nn.Module], config: ASATransformerConfig) -> float:
    """Weights that multiply every token (projections, MLP, logits), over all TP/PP ranks.

    Embedding lookups cost nothing; compressor weights see one block per stride; MoE experts
    are all counted (an upper bound).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    total = 0.0
    for chunk in chunks:
        for name, param in unwrap(chunk).named_parameters():
            if param.dim() < 2 or "embedding" in name:
                continue
            count = param.numel() * (tp if getattr(param, "tensor_model_parallel", False) else 1)
            total += count / config.compress_stride if "compressor" in name else count
    device = "cuda" if torch.cuda.is_available() else "cpu"
    value = torch.tensor([total], dtype=torch.float64, device=device)
    dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    return float(value)


def attention_flops(config: ASATransformerConfig, seq: int) -> tuple[int, int]:
    """Training FLOPs of attention for one sequence: (what the pattern computes, full causal)."""
    sparse = dense = 0
    causal = flops.causal_pairs(seq)
    window = flops.window_pairs(seq, config.sliding_window_size)
    compressed = flops.compressed_pairs(seq, config.compress_block_size, config.compress_stride)
    selected = flops.selected_pairs(seq, config.select_block_size, config.select_top_n)
    pairs = {"L": window, "G": compressed + selected, "D": causal,
             "N": compressed + selected + window}
    for n in range(1, config.num_layers + 1):
        kind = config.layer_kind(n)
        if kind in "LG":
            qk, v = config.qk_head_dim + config.qk_pos_emb_head_dim, config.v_head_dim
        else:
            qk = v = config.kv_channels
        heads = config.num_attention_heads
        sparse += flops.attention_flops(pairs[kind], heads, qk, v, backward=True)
        dense += flops.attention_flops(causal, heads, qk, v, backward=True)
    return sparse, dense


# ----------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    state = {
        "random": random.getstate(), "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def sharded_state(chunks, optimizer, scheduler, iteration: int, *, is_loading: bool,
                  with_rng: bool = True) -> dict:
    """Model + optimizer + scheduler + iteration + per-rank RNG, as dist_checkpointing wants."""
    model = unwrap(chunks[0]).sharded_state_dict()
    state = {
        "model": model,
        "optimizer": optimizer.sharded_state_dict(
            model, is_loading=is_loading, metadata=OPTIMIZER_SHARDING
        ),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
    }
    if with_rng:
        state["rng_state"] = ShardedObject(
            "rng_state", rng_state(),
            (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_context_parallel_world_size()),
            (parallel_state.get_pipeline_model_parallel_rank(),
             parallel_state.get_tensor_model_parallel_rank(),
             parallel_state.get_context_parallel_rank()),
            replica_id=parallel_state.get_data_parallel_rank(),
        )
    return state


def save_checkpoint(args, chunks, optimizer, scheduler, iteration: int, record: dict,
                    tokenizer_dir: Path | None) -> Path:
    """Write to a hidden folder, then rename it into place: a crash never leaves a partial
    checkpoint where --load would find it."""
    root = args.save
    final, scratch = root / f"iter_{iteration:07d}", root / f".iter_{iteration:07d}.partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    dist.barrier()
    state = sharded_state(chunks, optimizer, scheduler, iteration, is_loading=False)
    dist_checkpointing.save(state, str(scratch))
    dist.barrier()
    if rank0:
        training = {**record["training"], "layout": layout(), "iteration": iteration}
        text = json.dumps({**record, "training": training}, indent=2)
        (scratch / ASA_CONFIG_FILE).write_text(text + "\n")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, scratch / TOKENIZER_DIR)
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
        latest = root / f".{LATEST_FILE}.partial"
        latest.write_text(f"{iteration}\n")
        latest.replace(root / LATEST_FILE)
    dist.barrier()
    return final


def find_checkpoint(folder: Path) -> Path:
    """A checkpoint folder itself, or a --save folder (its latest checkpoint)."""
    if (folder / ASA_CONFIG_FILE).exists():
        return folder
    latest = folder / LATEST_FILE
    if not latest.exists():
        raise ValueError(
            f"--load {folder}: no checkpoint there (no {ASA_CONFIG_FILE} or {LATEST_FILE})"
        )
    text = latest.read_text().strip()
    path = folder / f"iter_{int(text):07d}" if text.isdigit() else None
    if path is None or not (path / ASA_CONFIG_FILE).exists():
        raise ValueError(
            f"--load {folder}: {LATEST_FILE} holds {text!r}, which names no checkpoint of "
            "this script with its " + ASA_CONFIG_FILE
        )
    return path


def resume_fields(record: dict) -> dict:
    """What a resumed run must share with its checkpoint: the model and the samples."""
    training = record["training"]
    return {
        **record["config"], **record["model"],
        "seq_length": training["seq_length"], "document_mask": training["document_mask"],
    }


def check_checkpoint_config(path: Path, record: dict) -> dict:
    """Refuse, before training, a checkpoint of another model; return its record."""
    saved = json.loads((path / ASA_CONFIG_FILE).read_text())
    if saved.get("format") != RECORD_FORMAT or "training" not in saved:
        raise ValueError(
            f"--load {path}: {ASA_CONFIG_FILE} is not a record of this script (format "
            f"{saved.get('format')!r}, training state {'training' in saved}); resume only "
            "from checkpoints that pretrain_asa.py --save wrote"
        )
    old, new = resume_fields(saved), resume_fields(record)
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if differ:
        lines = ", ".join(f"{k}: saved {old.get(k)!r}, now {new.get(k)!r}" for k in differ)
        raise ValueError(f"--load {path}: the checkpoint is of another configuration ({lines})")
    return saved


def init_optimizer_state(optimizer) -> None:
    """Without apex or Transformer Engine, Megatron's optimizer state_dict reads Adam's
    per-parameter 'step', which exists only after a first step: take one of size zero, so
    that the state exists for the checkpoint to overwrite."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = inner.optimizer
        if adam is None or adam.state:
            continue
        rates = [group["lr"] for group in adam.param_groups]
        for group in adam.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        adam.step()
        adam.zero_grad(set_to_none=True)
        for group, rate in zip(adam.param_groups, rates, strict=True):
            group["lr"] = rate


def restore_adam_steps(optimizer) -> None:
    """Without apex or Transformer Engine, the distributed optimizer's load leaves Adam's
    per-parameter 'step' wrong (the value of the state it overwrote, one tensor shared by
    every parameter) while each param group holds the saved step: give every parameter its
    own tensor of its group's step."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = inner.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state.get(param)
                if state and "step" in state and group.get("step") is not None:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def load_checkpoint(path: Path, meta: dict, chunks, optimizer, scheduler) -> int:
    init_optimizer_state(optimizer)
    same_layout = meta["training"]["layout"] == layout()
    state = sharded_state(chunks, optimizer, scheduler, 0, is_loading=True, with_rng=same_layout)
    loaded = dist_checkpointing.load(state, str(path))
    unwrap(chunks[0]).load_state_dict(loaded["model"])
    with torch.no_grad():  # fp32 main parameters are views of the model's parameters
        optimizer.load_state_dict(loaded["optimizer"])
    restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    return int(loaded["iteration"])


# ----------------------------------------------------------------------------- training


def loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Mean loss over unmasked tokens; also reports (sum, count) for exact logging."""
    mask = loss_mask.reshape(-1).float()
    total = (output.float().reshape(-1) * mask).sum()
    count = mask.sum()
    return total / count.clamp(min=1), {"lm loss": torch.stack([total.detach(), count])}


def forward_step(data_iterator: Iterator, model: torch.nn.Module):
    batch, packed = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
        packed_seq_params=packed,
    )
    return output, partial(loss_func, batch["loss_mask"])


def run_step(chunks, micro_batches: list[dict], device: torch.device, args,
             forward_only: bool) -> float:
    """Forward (and backward) over the micro batches; the mean loss over every DP/CP rank."""
    inputs = [model_inputs(batch, device) for batch in micro_batches]
    seq = inputs[0][0]["tokens"].shape[1] * parallel_state.get_context_parallel_world_size()
    if not forward_only:
        for chunk in chunks:
            chunk.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(inputs),
        model=chunks[0],
        num_microbatches=len(inputs),
        seq_length=seq,
        micro_batch_size=inputs[0][0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    if not forward_only:
        finalize_model_grads(chunks)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for report in reports or []:
        totals += report["lm loss"].to(totals)
    data_parallel = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dist.all_reduce(totals, group=data_parallel)
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(totals, src=last, group=pipeline)
    return float(totals[0] / totals[1].clamp(min=1))


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def check_inputs(
    args: argparse.Namespace, config: ASATransformerConfig
) -> tuple[tuple, dict, Path | None, dict | None]:
    """The data, this run's checkpoint record, and the checkpoint to resume from with its
    record (None, None without --load), each checked against the flags."""
    data = open_data(args)
    vocab = padded_vocab_size(data[0].vocab_size, args.tensor_model_parallel_size)
    record = checkpoint_record(args, config, vocab)
    if args.load is None:
        return data, record, None, None
    checkpoint = find_checkpoint(args.load)
    return data, record, checkpoint, check_checkpoint_config(checkpoint, record)


def train(args: argparse.Namespace) -> list[float]:
    """Train; returns the loss of every step this run took (on every rank)."""
    config = check_args(args)
    # Data already there is checked before starting; a corpus to prepare, once prepared.
    checked = None if args.prepare_stdlib else check_inputs(args, config)
    device = init_distributed(args)
    if checked is None:
        prepare_stdlib(args)
        checked = check_inputs(args, config)
    (tokenizer, prefix, tokenizer_dir), record, checkpoint, meta = checked
    vocab = record["model"]["vocab_size"]
    training = PRESET_TRAINING[args.preset]
    global_batch = args.global_batch_size
    dp = parallel_state.get_data_parallel_world_size()

    evals = args.train_iters // args.eval_interval if args.eval_interval else 0
    train_set, valid_set = build_gpt_datasets(
        prefix, tokenizer, args.seq_length, split=args.split,
        train_samples=args.train_iters * global_batch,
        valid_samples=max(1, args.eval_iters * global_batch),
        seed=args.seed, document_boundaries=args.document_mask,
    )
    if evals and valid_set is None:
        raise ValueError(f"--split {args.split} leaves no validation documents for --eval-interval")

    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    distributed_optimizer = not args.no_distributed_optimizer
    chunks = build_model(config, vocab, args.seq_length, distributed_optimizer)
    lr = args.lr or training["lr"]
    min_lr = lr / 10 if args.min_lr is None else args.min_lr
    use_foreach_multi_tensor_ops()  # no per-parameter host syncs without apex or TE
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=args.weight_decay,
            adam_beta1=0.9, adam_beta2=0.95, clip_grad=args.clip_grad, bf16=config.bf16,
            params_dtype=config.params_dtype, use_distributed_optimizer=distributed_optimizer,
        ),
        chunks,
    )
    warmup = training["lr_warmup_iters"] if args.lr_warmup_iters is None else args.lr_warmup_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=min(warmup, args.train_iters - 1), lr_decay_steps=args.train_iters,
        lr_decay_style="cosine", start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant",
    )
    iteration = 0
    if checkpoint is not None:
        iteration = load_checkpoint(checkpoint, meta, chunks, optimizer, scheduler)

    rank, world = dist.get_rank(), dist.get_world_size()
    logger = rank == world - 1  # holds the last pipeline stage
    writer = None
    if logger and args.tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.tensorboard))
    log_file = open(args.log_file, "a") if logger and args.log_file else None  # noqa: SIM115

    tokens_per_step = global_batch * args.seq_length
    attn_sparse, attn_dense = attention_flops(config, args.seq_length)
    matmul = 6 * matmul_params(chunks, config) * tokens_per_step
    flops_sparse = matmul + attn_sparse * global_batch
    flops_dense = matmul + attn_dense * global_batch
    if logger:
        print(
            f"ASA {args.preset} pattern={args.pattern} layers={config.num_layers} "
            f"seq={args.seq_length} global_batch={global_batch} world={world} "
            f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
            f"CP={args.context_parallel_size} DP={dp} dtype={config.params_dtype} "
            f"start={iteration}", flush=True,
        )

    profiler = StepProfiler(args.profile_dir, *args.profile_steps, rank=rank, echo=logger)
    batches = Batches(train_set, args, global_batch)
    valid_batches = Batches(valid_set, args, global_batch) if evals else None
    losses = []
    final = checkpoint  # the checkpoint holding the weights this run ends with
    while iteration < args.train_iters:
        for chunk in chunks:
            chunk.train()
        profiler.before(iteration + 1)
        start = time.perf_counter()
        loss = run_step(chunks, batches.step(iteration), device, args, forward_only=False)
        _, grad_norm, _ = optimizer.step()
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step(increment=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        iteration += 1
        profiler.after(iteration)
        losses.append(loss)
        metrics = {
            "step": iteration, "tokens": iteration * tokens_per_step, "loss": loss, "lr": lr_now,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_step / seconds,
            "tflops_sparse": flops_sparse / seconds / world / 1e12,
            "tflops_dense_equiv": flops_dense / seconds / world / 1e12,
            "peak_mem_gib": peak_memory_gib(),
        }
        if valid_batches is not None and iteration % args.eval_interval == 0:
            metrics["eval_loss"] = evaluate(chunks, valid_batches, device, args)
        if logger:
            echo = (
                iteration % args.log_interval == 0 or iteration == args.train_iters
                or "eval_loss" in metrics
            )
            log_step(metrics, args.train_iters, writer, log_file, echo)
        if args.save is not None and (
            iteration == args.train_iters
            or (args.save_interval and iteration % args.save_interval == 0)
        ):
            final = save_checkpoint(
                args, chunks, optimizer, scheduler, iteration, record, tokenizer_dir
            )
            if logger:
                print(f"saved {final}", flush=True)
    if writer is not None:
        writer.close()
    if log_file is not None:
        log_file.close()
    if args.export_hf is not None and rank == 0:
        export(final, args.export_hf)
    return losses


def export(checkpoint: Path, out: Path) -> None:
    """Convert a checkpoint as `megatron-nsa export-hf` does (the other ranks may exit)."""
    from megatron_nsa.hf import export_hf

    start = time.perf_counter()
    export_hf(checkpoint, out)
    print(f"exported {checkpoint} to {out} ({time.perf_counter() - start:.1f} s)", flush=True)


def evaluate(chunks, valid_batches: Batches, device: torch.device, args) -> float:
    """Mean loss over the first --eval-iters validation steps (the same ones every time)."""
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        losses = [
            run_step(chunks, valid_batches.step(i), device, args, forward_only=True)
            for i in range(args.eval_iters)
        ]
    return sum(losses) / len(losses)


class StepProfiler:
    """torch.profiler over the steps FIRST..LAST (counted from 1 over the whole training, so
    a resumed run profiles those it takes): where a step's time goes, kernel by kernel.
    Writes `trace_rank{r}.json` (chrome://tracing, Perfetto) and `ops_rank{r}.txt`, the ops
    ranked by their own GPU time (CPU time without a GPU)."""

    def __init__(self, folder: Path | None, first: int, last: int, rank: int, echo: bool):
        self.folder, self.first, self.last, self.rank, self.echo = folder, first, last, rank, echo
        self.profile: torch.profiler.profile | None = None
        self.started = 0

    def before(self, step: int) -> None:
        if self.folder is None or self.profile is not None or not self.first <= step <= self.last:
            return
        self.started = step
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.profile = torch.profiler.profile(activities=activities)
        self.profile.__enter__()

    def after(self, step: int) -> None:
        if self.profile is None or step != self.last:
            return
        self.profile.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        steps = f"steps {self.started}-{self.last}, rank {self.rank}"
        table = self.profile.key_averages().table(sort_by=key, row_limit=40)
        for name, write in (
            (f"trace_rank{self.rank}.json", self.profile.export_chrome_trace),
            (f"ops_rank{self.rank}.txt", lambda path: Path(path).write_text(
                f"# {steps}, ranked by {key}\n{table}\n")),
        ):
            partial_path = self.folder / f".{name}.partial"
            write(str(partial_path))
            partial_path.replace(self.folder / name)
        if self.echo:
            print(f"profile of {steps}: {self.folder}", flush=True)
        self.profile = None


def log_step(metrics: dict, total: int, writer, log_file, echo: bool = True) -> None:
    line = (
        f"step {metrics['step']}/{total} | loss {metrics['loss']:.6f} | lr {metrics['lr']:.3e} | "
        f"{metrics['tokens_per_s']:,.0f} tok/s | TFLOP/s/GPU {metrics['tflops_sparse']:.2f} "
        f"sparse, {metrics['tflops_dense_equiv']:.2f} dense-equiv | "
        f"peak mem {metrics['peak_mem_gib']:.2f} GiB"
    )
    if "eval_loss" in metrics:
        line += f" | eval loss {metrics['eval_loss']:.6f}"
    if echo:
        print(line, flush=True)
    if writer is not None:
        for key, value in metrics.items():
            if key != "step" and value is not None:
                writer.add_scalar(key, value, metrics["step"])
    if log_file is not None:
        log_file.write(json.dumps(metrics) + "\n")
        log_file.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: 0 on success, 2 (with one clear line) on bad input."""
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, NotImplementedError, FileExistsError) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
