"""Test support: Megatron-Core on CPU processes with gloo.

megatron-core assumes CUDA in a few places (RNG state, streams, `device="cuda"` buffers in
the optimizer and DDP, `param.type()` checks) and, in its MoE router, Transformer Engine.
`install_cpu_standins` replaces those calls with CPU equivalents. It patches torch
globally, so it runs only inside the worker processes that `run_distributed` spawns, never
in the pytest process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import traceback
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

_FACTORIES = ("tensor", "zeros", "empty", "ones", "full", "arange", "zeros_like", "empty_like")


class _Stream:
    """Stand-in for torch.cuda.Stream: every operation is already synchronous on CPU."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args, **kwargs) -> None:
        return None


def _on_cpu(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    device = torch.device(device)
    return torch.device("cpu") if device.type == "cuda" else device


def install_cpu_standins() -> None:
    """Make megatron-core's CUDA calls run on CPU (call once per worker process)."""
    for name in _FACTORIES:
        original = getattr(torch, name)

        @functools.wraps(original)
        def factory(*args, _original=original, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _on_cpu(kwargs["device"])
            return _original(*args, **kwargs)

        setattr(torch, name, factory)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    tensor_type = torch.Tensor.type

    def type_(self, *args, **kwargs):
        # Megatron's optimizers accept only torch.cuda.*Tensor parameters.
        if args or kwargs or self.is_cuda:
            return tensor_type(self, *args, **kwargs)
        return tensor_type(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda *args, **kwargs: None
    cuda.Stream = _Stream
    cuda.current_stream = lambda *args, **kwargs: _Stream()
    cuda.default_stream = lambda *args, **kwargs: _Stream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.manual_seed = lambda *args, **kwargs: None
    cuda.manual_seed_all = lambda *args, **kwargs: None
    cuda.get_rng_state = lambda *args, **kwargs: torch.zeros(1, dtype=torch.uint8)
    cuda.set_rng_state = lambda *args, **kwargs: None

    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state = lambda *args, **kwargs: torch.zeros(1, dtype=torch.uint8)
    random._set_cuda_rng_state = lambda *args, **kwargs: None

    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16's MoE router reads this name, defined only when TE imports.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    install_cpu_standins()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        # Print before the teardown so a hang elsewhere cannot hide the cause.
        traceback.print_exc()
        raise
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300.0) -> None:
    """Run fn(rank, world_size, *args) on `world_size` CPU processes joined by gloo.

    fn must be a module-level function (it is pickled); it asserts what it checks. Raises
    if any process fails or the run exceeds `timeout` seconds.
    """
    context = mp.start_processes(
        _worker,
        args=(world_size, free_port(), fn, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = timeout
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout} s")


def _check_worker(rank: int, world_size: int, checks: list[Callable], path: str) -> None:
    results = {}
    for check in checks:
        try:
            check(rank, world_size)
            results[check.__name__] = None
        except Exception:
            results[check.__name__] = f"rank {rank}: {traceback.format_exc()}"
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        merged = {name: next((r[name] for r in gathered if r[name]), None) for name in results}
        torch.save(merged, path)


def run_checks(
    checks: list[Callable], world_size: int, path: str, timeout: float = 300.0
) -> dict[str, str | None]:
    """Run each check(rank, world_size) in order in one distributed run.

    Returns {check name: None if it passed on every rank, else a traceback}, so one spawn
    (its start-up costs seconds) serves several tests that report separately.
    """
    run_distributed(_check_worker, world_size, checks, path, timeout=timeout)
    return torch.load(path)
