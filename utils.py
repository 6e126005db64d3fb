"""Distributed set-up, seeding and checkpoints: everything a run needs to stop and continue exactly.

Checkpoints hold only tensors and plain containers (the config as YAML text, RNG states as tensors and
lists) so that they load with ``torch.load(weights_only=True)``: a file from elsewhere can never run code.
They are written to a temporary file and renamed, so a crash mid-write leaves the previous file intact.
"""

import logging
import os
import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models import checkpoint_filter_fn

CHECKPOINT_PATTERN = re.compile(r"ckpt_epoch_(\d+)\.pth")
LATEST_NAME = "latest.pth"
BEST_NAME = "best.pth"


class RunError(RuntimeError):
    """A user-facing failure: the run stops with this one-line message (what is wrong and how to fix it)."""


class CheckpointError(RunError):
    """A checkpoint that cannot be read or does not fit the model."""


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
    if choice not in ("auto", "cpu", "cuda"):
        raise RunError(f"Invalid DEVICE {choice!r}. Only 'auto', 'cpu' and 'cuda' are supported.")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("DEVICE is 'cuda' but no CUDA device is visible; use DEVICE auto or cpu.")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_choice: str) -> DistEnv:
    """Join the process group when launched by torchrun (RANK set), else run as a plain single process.

    NCCL carries the collectives between CUDA devices and gloo between CPU processes.
    """
    if "RANK" not in os.environ:
        return DistEnv(rank=0, world_size=1, local_rank=0, device=resolve_device(device_choice, 0))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's epoch.

    Re-seeding every epoch from (seed, rank, epoch) makes augmentation, mixup, drop path and the worker
    seeds a pure function of where the run is, so a run restarted from an epoch checkpoint replays the
    following epochs exactly as the uninterrupted run did.
    """
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy and torch as tensors and plain containers (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op for one process) and return it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------------------------
# Checkpoint files


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, flushed to disk, then renamed over the target."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, accepting only tensors and plain containers.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds other objects (nothing in it runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path given to --resume/--pretrained")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing {path}: it holds objects other than tensors and plain containers ({first_line}); "
            "only weights-only checkpoints are loaded, re-save it as a dict of tensors"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__}); "
            "delete it or point to another checkpoint"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return checkpoint


def epoch_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The ``ckpt_epoch_<n>.pth`` files in ``output_dir`` as (n, path), oldest epoch first."""
    found = []
    for path in output_dir.glob("ckpt_epoch_*.pth"):
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def resumable_checkpoints(output_dir: Path) -> list[Path]:
    """The files a run could continue from: ``latest.pth`` and the epoch checkpoints (not ``best.pth``)."""
    latest = output_dir / LATEST_NAME
    return [p for _, p in epoch_checkpoints(output_dir)] + ([latest] if latest.is_file() else [])


def _try_load(path: Path, logger: logging.Logger) -> dict[str, Any] | None:
    try:
        return load_checkpoint_file(path)
    except CheckpointError as e:
        logger.warning(f"auto-resume skips {path.name}: {e}")
        return None


def find_resume_checkpoint(output_dir: Path, logger: logging.Logger) -> tuple[Path, dict[str, Any]] | None:
    """The loadable checkpoint of the highest epoch in ``output_dir``, with its contents, or None.

    ``latest.pth`` is written every epoch and is normally the one; an epoch file beyond it (a kill between the
    two writes) or below it (``latest.pth`` unreadable) is taken by the epoch in its name. File times are not
    used, so a copied output folder resumes the same way. Unreadable files are skipped with a warning.
    """
    latest_path = output_dir / LATEST_NAME
    latest = _try_load(latest_path, logger) if latest_path.is_file() else None
    latest_epoch = latest.get("epoch", -1) if latest is not None else -1
    for epoch, path in reversed(epoch_checkpoints(output_dir)):
        if epoch <= latest_epoch:
            break
        checkpoint = _try_load(path, logger)
        if checkpoint is not None:
            return path, checkpoint
    return (latest_path, latest) if latest is not None else None


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest epoch checkpoints (``keep`` <= 0 keeps all); returns what was deleted."""
    if keep <= 0:
        return []
    doomed = [path for _, path in epoch_checkpoints(output_dir)[:-keep]]
    for path in doomed:
        path.unlink()
    return doomed


# --------------------------------------------------------------------------------------------------------------
# Fitting weights to a model


def fit_state_dict(checkpoint: Mapping[str, Any], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (ours, the release's, or a bare state dict), checked against ``model``.

    Raises:
        CheckpointError: listing the mismatched names and shapes (another variant, size or class count).
    """
    try:
        return checkpoint_filter_fn(checkpoint, model)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_pretrained(model: nn.Module, path: str | Path, logger: logging.Logger) -> list[str]:
    """Load weights only, for fine-tuning; a head of another class count is skipped and keeps its fresh init.

    Returns:
        The names of the skipped keys.
    """
    checkpoint = load_checkpoint_file(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
    expected = model.state_dict()
    weights = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in checkpoint.items()}
    skipped = sorted(k for k, v in weights.items()
                     if k.startswith("head.") and k in expected and v.shape != expected[k].shape)
    weights.update({k: expected[k] for k in skipped})
    model.load_state_dict(fit_state_dict(weights, model, f"pretrained checkpoint {path}"))
    if skipped:
        logger.info(f"pretrained {path}: another class count, so {', '.join(skipped)} keep their fresh init")
    logger.info(f"loaded pretrained weights from {path}")
    return skipped
