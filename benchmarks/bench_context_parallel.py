"""Context parallelism on two GPUs: exactness in bf16, per-layer speed and communication at
long context, and training on a million tokens.

1. Check (`--check-length`, default 16384; 0 skips): a 2-layer "LG" GPTModel (Megatron-Core,
   ASA specs, nsa_backend="triton") runs the same batch at CP=1 and at CP=2 in bf16. Per-token
   losses and every parameter gradient (summed over the CP ranks) are compared; the CP=2 error
   against CP=1 must stay within twice the bf16 error of CP=1 against an fp32 run (plus a
   floor), since CP only changes where each op's tiles start.
2. Speed (`--lengths`, none skips): forward + backward of one attention layer (its
   projections included) on [T / CP, 1, hidden] bf16 hidden states, for the local ("L"),
   global ("G") and dense ("D", full causal GQA through SDPA, keys and values all-gathered
   under CP) layers, with CP=1 (each GPU runs the whole sequence) and CP=2. Reports the
   median over `--steps` steps after warm-up (the slower rank), the bytes each rank sent per
   step, and the time of the CP exchanges: one more step with `comm_timer` on, which waits
   for each exchange where it is issued, so the time is what they cost without overlap
   (slower rank), next to its share of the layer's time.
3. Training (`--train-length`, default 1048576; 0 skips): a 2-layer "LG" GPTModel at CP=2
   trains (forward, backward with full activation recompute, Adam step, Megatron's DDP and
   distributed optimizer) on one batch of T tokens: step time, CP communication and peak
   memory. With `--find-max-length` T then doubles until a step runs out of memory or is
   predicted (4x the last measurement: the sparse attention is quadratic in T / s) to end
   after `--max-seconds`. Running out of memory ends the run: the rank that fails prints the
   length and exits, and torchrun stops the others.

    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py [--check-length 16384] \\
        [--lengths 65536 131072 262144] [--steps 10] [--train-length 1048576] \\
        [--find-max-length] [--max-seconds 600] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

import megatron.core
import torch
import torch.distributed as dist
from bench_model import make_config as model_config
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import build_module

from megatron_nsa import ASATransformerConfig, get_asa_decoder_block_spec, get_asa_layer_spec
from megatron_nsa.compat import get_batch_on_this_cp_rank
from megatron_nsa.context_parallel import ContextParallelLayout, bytes_sent, comm_timer

VOCAB = 32768
KINDS = {"L": "local (MLA window)", "G": "global (GLA cmp+slc)", "D": "dense GQA (SDPA)"}
FULL_RECOMPUTE = dict(
    recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
)


def make_config(cp: int, dtype: torch.dtype = torch.bfloat16, **overrides) -> ASATransformerConfig:
    """bench_model.py's model (hidden 1024, 16 heads, 4 GQA groups for D, MLA latent 256, 2
    GLA latent heads of 128, window 512, NSA blocks l=32, s=16, l'=64, n=16) with 2 layers."""
    fields = dict(num_layers=2, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                  context_parallel_size=cp, **device_fields())
    return model_config(**{**fields, **overrides})


def device() -> torch.device:
    """This rank's GPU; the CPU where there is none (the functions here then run on gloo
    with examples/cpu_compat.py's stand-ins, which is how the tests check them)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_fields() -> dict:
    """Config fields that depend on the device: Triton kernels and GPU initialization on
    CUDA, the reference ops and CPU initialization elsewhere."""
    cuda = torch.cuda.is_available()
    return {"nsa_backend": "triton" if cuda else "reference", "use_cpu_initialization": not cuda}


class Stopwatch:
    """Milliseconds of GPU work between `start()` and `stop()` (CUDA events), or wall time
    on CPU."""

    def start(self) -> None:
        if torch.cuda.is_available():
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if torch.cuda.is_available():
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end)
        return (time.perf_counter() - self.begin) * 1e3


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def length_label(n: int) -> str:
    """1048576 -> "1M", 65536 -> "64k"."""
    if n and n % 2**20 == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}k" if n and n % 2**10 == 0 else str(n)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Largest torch.cuda.max_memory_allocated over the ranks; None on CPU."""
    if not torch.cuda.is_available():
        return None
    return slowest(torch.cuda.max_memory_allocated() / 2**30)


def set_layout(cp: int) -> None:
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


def slowest(value: float) -> float:
    """The largest `value` over all ranks."""
    tensor = torch.tensor(value, device=device(), dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def report(line: str, out: str | None = None, lines: list[str] | None = None) -> None:
    """Print on rank 0 (flushed); with `out`, also rewrite that file with `lines` + line."""
    if lines is not None:
        lines.append(line)
    if dist.get_rank() != 0:
        return
    print(line, flush=True)
    if out and lines is not None:
        write_atomic(out, "\n".join(lines) + "\n")


def write_atomic(path: str, text: str, mode: str = "w") -> None:
    """Write (or with mode "a" append) through a temporary file renamed over `path`."""
    old = ""
    if mode == "a" and os.path.exists(path):
        with open(path) as f:
            old = f.read()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(old + text)
    os.replace(tmp, path)


def out_of_memory(what: str) -> NoReturn:
    """Report running out of GPU memory and exit at once: the other ranks may wait in a
    collective this rank never reaches, so only ending the processes (torchrun stops the
    rest) frees them."""
    print(f"rank {dist.get_rank()}: {what}: out of memory", flush=True)
    os._exit(1)


class Budget:
    """A wall-clock budget that every rank reads alike: a measurement starts only if all
    ranks agree that it is predicted to end in time."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def allows(self, predicted: float) -> bool:
        left = self.seconds - (time.monotonic() - self.start) - predicted
        return -slowest(-left) >= 0


# --- 1. exactness ---------------------------------------------------------------------------


def run_model(cp: int, dtype: torch.dtype, weights: dict | None, tokens: torch.Tensor):
    """(per-token loss [T] in global order, gradients summed over the CP group, weights)."""
    set_layout(cp)
    config = make_config(cp, dtype)
    torch.manual_seed(0)
    model = GPTModel(
        config, get_asa_decoder_block_spec(config, use_transformer_engine=False), VOCAB,
        tokens.shape[1], position_embedding_type="rope",
    )
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor)}
    wrapped = Float16Module(config, model) if dtype == torch.bfloat16 else model
    group = parallel_state.get_context_parallel_group()
    layout = ContextParallelLayout.of_rank(cp, group.rank(), tokens.shape[1])
    labels = torch.roll(tokens, -1, 1)
    if cp > 1:
        local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels}, group)
    else:
        local = {"tokens": tokens, "labels": labels}
    positions = torch.arange(tokens.shape[1] // cp, device=device())[None]
    losses = wrapped(local["tokens"], positions, None, labels=local["labels"]).float()
    (losses.sum() / tokens.numel()).backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.float()
        dist.all_reduce(grad, group=group)
        grads[name] = grad
    gathered = [torch.empty_like(losses) for _ in range(cp)]
    dist.all_gather(gathered, losses.contiguous(), group=group)
    full = torch.empty(tokens.shape[1], device=device())
    for rank, part in enumerate(gathered):
        index = ContextParallelLayout.of_rank(cp, rank, tokens.shape[1]).local_indices(device())
        full[index] = part[0]
    assert torch.equal(full[layout.local_indices(device())], losses[0])
    return full, grads, weights


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(length: int, cp: int) -> tuple[list[str], int]:
    """CP=cp against CP=1 in bf16 (fp32 as the reference of the bound): markdown rows and
    the number of tensors outside the bound."""
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, length), device=device())
    loss32, grads32, weights = run_model(1, torch.float32, None, tokens)
    loss1, grads1, _ = run_model(1, torch.bfloat16, weights, tokens)
    loss_cp, grads_cp, _ = run_model(cp, torch.bfloat16, weights, tokens)
    rows = [
        f"Check at T={length}, bf16, nsa_backend={make_config(cp).nsa_backend}: relative L2 "
        "error",
        "",
        f"| tensor | CP={cp} vs CP=1 (bf16) | CP=1 bf16 vs fp32 | within 2x + 1e-3 |",
        "|---|---|---|---|",
    ]
    failed = 0
    for name in ["per-token loss", *grads1]:
        if name == "per-token loss":
            cp_err, ref_err = relative_error(loss_cp, loss1), relative_error(loss1, loss32)
        else:
            cp_err = relative_error(grads_cp[name], grads1[name])
            ref_err = relative_error(grads1[name], grads32[name])
        ok = cp_err <= 2 * ref_err + 1e-3
        failed += not ok
        rows.append(f"| {name} | {cp_err:.2e} | {ref_err:.2e} | {'yes' if ok else 'NO'} |")
    rows += ["", f"{'all within' if not failed else f'{failed} tensors outside'} the bound", ""]
    return rows, failed


# --- 2. speed -------------------------------------------------------------------------------


def measure(step: Callable[[], None], steps: int, warmup: int) -> dict:
    """Run `step` (the same number of times on every rank: collectives must match): warm-up,
    `steps` timed steps, one step with the comm timer on. Returns ms (median, slower rank),
    comm_ms (slower rank) and its share of ms, mb_sent (per step, this rank) and peak_gib
    (see `peak_memory_gib`, since the reset before the warm-up)."""
    reset_peak_memory()
    for _ in range(warmup):  # compilation, allocator
        step()
    bytes_sent.clear()
    times, watch = [], Stopwatch()
    for _ in range(steps):
        dist.barrier()
        watch.start()
        step()
        times.append(watch.stop())
    sent = sum(bytes_sent.values()) / steps
    dist.barrier()
    comm_timer.start()
    step()
    comm = slowest(comm_timer.stop().total())
    ms = slowest(statistics.median(times))
    return {
        "ms": ms,
        "comm_ms": comm,
        "comm_share": comm / ms,
        "mb_sent": sent / 2**20,
        "peak_gib": peak_memory_gib(),
    }


def time_layer(
    config: ASATransformerConfig, kind: str, length: int, steps: int, warmup: int = 3
) -> dict[str, float]:
    """Forward + backward of one `kind` attention layer of `config` (CP from the config) on
    [length / CP, 1, hidden] bf16 hidden states; see `measure`."""
    cp = config.context_parallel_size
    set_layout(cp)
    spec = get_asa_layer_spec(config, kind, use_transformer_engine=False)
    layer = build_module(spec.submodules.self_attention, config=config, layer_number=1)
    hidden = torch.randn(length // cp, 1, config.hidden_size, device=device(),
                         dtype=config.params_dtype, requires_grad=True)
    grad = torch.randn_like(hidden)

    def step() -> None:
        out, _ = layer(hidden)
        out.backward(grad)

    return measure(step, steps, warmup)


def speed(lengths: Sequence[int], steps: int, out: str | None, lines: list[str]) -> None:
    report(
        "Forward + backward of one attention layer (projections included), bf16, median of "
        f"{steps} steps, slower rank; comm = the CP exchanges of one step, timed one by one "
        "(no overlap), and their share of the CP=2 time; MB = bytes each rank sent per step.",
        out, lines,
    )
    report("", out, lines)
    report("| layer | T | CP=1 ms | CP=2 ms | speed-up | CP=2 comm ms | comm share | "
           "CP=2 MB sent |", out, lines)
    report("|---|---|---|---|---|---|---|---|", out, lines)
    for kind, label in KINDS.items():
        for length in lengths:
            try:
                one = time_layer(make_config(1, num_layers=1, attention_pattern=kind), kind,
                                 length, steps)
                two = time_layer(make_config(2, num_layers=1, attention_pattern=kind), kind,
                                 length, steps)
            except torch.cuda.OutOfMemoryError:
                out_of_memory(f"{label} at T={length_label(length)}")
            report(
                f"| {label} | {length_label(length)} | {one['ms']:.1f} | {two['ms']:.1f} | "
                f"{one['ms'] / two['ms']:.2f}x | {two['comm_ms']:.2f} | "
                f"{100 * two['comm_share']:.1f}% | {two['mb_sent']:.1f} |",
                out, lines,
            )
            release_memory()


# --- 3. training ----------------------------------------------------------------------------


def train_steps(
    config: ASATransformerConfig, length: int, vocab: int, steps: int, warmup: int = 1
) -> dict[str, float]:
    """Train `config`'s GPTModel (Megatron DDP, distributed Adam) on one random batch of
    `length` tokens split over the CP group; one step = forward, backward, optimizer step.
    Returns `measure`'s numbers plus wall_s, the seconds the whole measurement took."""
    begin = time.monotonic()
    cp = config.context_parallel_size
    set_layout(cp)
    model = GPTModel(
        config, get_asa_decoder_block_spec(config, use_transformer_engine=False), vocab,
        length, position_embedding_type="rope", share_embeddings_and_output_weights=False,
    )
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(config, ddp, Float16Module(config, model))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0, bf16=True,
                        params_dtype=torch.bfloat16, use_distributed_optimizer=True),
        [model],
    )
    torch.manual_seed(2)
    tokens = torch.randint(0, vocab, (1, length), device=device())
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1)}
    if cp > 1:
        batch = get_batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_group())
    positions = torch.arange(length // cp, device=device())[None]

    def step() -> None:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model(batch["tokens"], positions, None, labels=batch["labels"]).float().mean()
        loss.backward()
        finalize_model_grads([model])
        optimizer.step()

    result = measure(step, steps, warmup)
    return {**result, "wall_s": slowest(time.monotonic() - begin)}


def release_memory() -> None:
    """Free what the last measurement left (Megatron's DDP and optimizer hold cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train(args: argparse.Namespace, lines: list[str]) -> None:
    config = make_config(2, attention_pattern="LG", **FULL_RECOMPUTE)
    report(
        f"Training a 2-layer \"LG\" GPTModel at CP=2 (vocabulary {args.train_vocab}, bf16, full "
        "activation recompute, DDP + distributed Adam): median of "
        f"{args.train_steps} steps after one warm-up, slower rank; peak = largest "
        "torch.cuda.max_memory_allocated over the ranks.", args.out, lines,
    )
    report("", args.out, lines)
    report("| T | step ms | CP comm ms | comm share | peak GiB |", args.out, lines)
    report("|---|---|---|---|---|", args.out, lines)
    budget = Budget(args.max_seconds)
    length = args.train_length
    while True:
        try:
            result = train_steps(config, length, args.train_vocab, args.train_steps)
        except torch.cuda.OutOfMemoryError:
            out_of_memory(f"training at T={length_label(length)}")
        release_memory()
        report(
            f"| {length_label(length)} | {result['ms']:.0f} | {result['comm_ms']:.1f} | "
            f"{100 * result['comm_share']:.1f}% | {gib(result['peak_gib'])} |", args.out, lines,
        )
        if not args.find_max_length:
            return
        predicted = 4 * result["wall_s"]
        if not budget.allows(predicted):
            report("", args.out, lines)
            report(
                f"Longest T trained: {length_label(length)} tokens; "
                f"T={length_label(2 * length)} not tried (predicted {predicted:.0f} s, beyond "
                f"--max-seconds {args.max_seconds:.0f}).", args.out, lines,
            )
            return
        length *= 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-length", type=int, default=16384, help="0: no check")
    parser.add_argument("--lengths", type=int, nargs="*", default=[65536, 131072, 262144])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--train-length", type=int, default=2**20, help="0: no training")
    parser.add_argument("--train-vocab", type=int, default=8192)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--find-max-length", action="store_true",
                        help="double --train-length until out of memory or --max-seconds")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="time budget of the --find-max-length search")
    parser.add_argument("--out", help="also write the results as markdown to FILE")
    args = parser.parse_args(argv)
    check_lengths("--check-length", [args.check_length], 4, allow_zero=True)
    check_lengths("--lengths", args.lengths, 4)
    check_lengths("--train-length", [args.train_length], 4, allow_zero=True)
    for name in ("steps", "train_steps", "train_vocab"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got "
                             f"{getattr(args, name)}")
    if args.max_seconds <= 0:
        raise SystemExit(f"--max-seconds must be positive, got {args.max_seconds}")
    return args


def check_lengths(
    flag: str, lengths: Sequence[int], multiple: int, allow_zero: bool = False
) -> None:
    """Refuse lengths that do not split into 2 * CP chunks of whole selection query blocks
    (`multiple` = 2 * CP * selection_query_block)."""
    bad = [n for n in lengths if n < 0 or n % multiple or (n == 0 and not allow_zero)]
    if bad:
        zero = " (or 0 to skip)" if allow_zero else ""
        raise SystemExit(
            f"{flag} {' '.join(map(str, bad))}: lengths must be positive multiples of "
            f"{multiple} (2 x CP x selection_query_block){zero}"
        )


def run(args: argparse.Namespace) -> None:
    """Every part `args` asks for, on the two ranks of the initialized process group."""
    lines: list[str] = []
    report(device_line(), args.out, lines)
    report("", args.out, lines)
    if args.check_length:
        for row in check(args.check_length, 2)[0]:
            report(row, args.out, lines)
    if args.lengths:
        speed(args.lengths, args.steps, args.out, lines)
        report("", args.out, lines)
    if args.train_length:
        train(args, lines)
    parallel_state.destroy_model_parallel()


def device_line() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (
        f"Devices: {dist.get_world_size()} x {name}, torch {torch.__version__}, megatron-core "
        f"{megatron.core.__version__}, Python {platform.python_version()}"
    )


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_context_parallel.py needs CUDA GPUs")
    if int(os.environ.get("WORLD_SIZE", 1)) != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    run(args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
