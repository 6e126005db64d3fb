"""Process-group set-up and the collectives a run needs: one plain process, or many under torchrun.

NCCL carries the collectives between CUDA devices and gloo between CPU processes. Every helper here is a
no-op (or the identity) for a single process, so callers need no rank checks.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from utils import RunError

DEVICES = ("auto", "cpu", "cuda")

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, local_rank: int) -> torch.device:
    """Map DEVICE ('auto', 'cpu' or 'cuda') to this process's device; 'auto' prefers CUDA when present."""
    if choice not in DEVICES:
        raise RunError(f"Invalid DEVICE {choice!r}. Only {', '.join(DEVICES)} are supported.")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("DEVICE is 'cuda' but no CUDA device is visible; use DEVICE auto or cpu.")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_choice: str) -> DistEnv:
    """Join the process group when launched by torchrun (RANK set), else run as a plain single process."""
    if "RANK" not in os.environ:
        return DistEnv(rank=0, world_size=1, local_rank=0, device=resolve_device(device_choice, 0))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Leave the process group if this process joined one (torchrun with a single process included)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op for one process) and return it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: T, env: DistEnv) -> T:
    """Rank 0's ``obj`` on every rank (pickled between this job's own processes)."""
    if not env.distributed:
        return obj
    holder = [obj if env.is_main else None]
    dist.broadcast_object_list(holder, src=0, device=env.device if env.device.type == "cuda" else None)
    return holder[0]


def gather_to_rank0(obj: T, env: DistEnv) -> list[T] | None:
    """Every rank's ``obj`` as a list in rank order on rank 0 (pickled between this job's own processes); None on
    the other ranks. Under NCCL the pickles pass through the device that ``init_distributed`` set."""
    if not env.distributed:
        return [obj]
    gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def on_rank0(fn: Callable[[], T], env: DistEnv) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    A :class:`RunError` raised there is raised again on every rank with the same message, so that all ranks
    stop together instead of waiting for rank 0 in the next collective.
    """
    result: Any = None
    error: tuple[type[RunError], str] | None = None
    if env.is_main:
        try:
            result = fn()
        except RunError as e:
            error = (type(e), str(e))
    result, error = broadcast_object((result, error), env)
    if error is not None:
        raise error[0](error[1])
    return result


def set_cpu_threads(data_workers: int, env: DistEnv) -> int | None:
    """On the CPU, leave a core to each data worker unless OMP_NUM_THREADS says otherwise; returns the thread
    count set, or None when it was left alone.

    Compute threads that share cores with the workers spin while waiting for each other, which was measured to
    slow a demo step tenfold on two cores; torchrun already sets OMP_NUM_THREADS=1 for several processes.
    """
    if env.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) - data_workers)
    torch.set_num_threads(threads)
    return threads
