"""Measuring speed, memory and work on any device: synchronised timings, images per second, peak memory and
multiply-accumulates.

``engine.throughput`` (``main.py --throughput``) and ``tools/benchmark.py`` time models with these, so their
numbers compare; the training log's memory figure is ``peak_memory_mb``; ``tools/benchmark.py`` and
``tools/publish.py`` count MACs with ``count_macs``.
"""

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on CUDA, the peak resident set on the CPU.

    On Linux the CPU figure is VmHWM, which, unlike getrusage's maxrss, does not start from the parent's
    size in a process that a launcher forked and executed.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_paired(steps: list[Callable[[], None]], device: torch.device, warmup: int, repeats: int
                ) -> list[list[float]]:
    """Seconds per run of each step, alternating between the steps run by run after ``warmup`` untimed runs,
    so that several implementations see the same machine state. Each run is synchronised."""
    for step in steps:
        for _ in range(warmup):
            step()
    synchronize(device)
    seconds: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for index, step in enumerate(steps):
            start = time.perf_counter()
            step()
            synchronize(device)
            seconds[index].append(time.perf_counter() - start)
    return seconds


def images_per_second(batch_size: int, seconds: list[float]) -> dict[str, float]:
    """Median, min and max images/s over timed runs of one batch each."""
    rates = [batch_size / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def count_macs(model: nn.Module, images: torch.Tensor) -> float:
    """Multiply-accumulates per image of ``model``'s forward pass in eval mode on ``images`` (torch's FLOP count,
    halved)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(images)
    return counter.get_total_flops() / 2 / images.shape[0]
