"""Test support: Megatron-Core on CPU processes with gloo.

The CPU stand-ins for megatron-core's CUDA calls live in examples/cpu_compat.py (the
training example needs them too). They patch torch globally, so they are installed only
inside the worker processes that `run_distributed` spawns, never in the pytest process.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from cpu_compat import install_cpu_standins  # noqa: E402


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
