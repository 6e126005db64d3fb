"""Small helpers shared by the run and the network: the user-facing error class, output folders, seeding and RNG
states, model unwrapping, and input sizes as (height, width). Nothing here imports a module of this project, so
that every module, config.py and models/ included, may import it."""

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class RunError(RuntimeError):
    """A user-facing failure: the run stops with this one-line message (what is wrong and how to fix it).

    Every error meant for the user (bad config, data, checkpoint or request) derives from it, so that
    ``main`` turns each into one line on stderr and exit status 1.
    """

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error reaches the main process rebuilt around the worker's traceback, whose last
        # line is "module.ErrorClass: message"; the user gets that message alone.
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def make_folder(path: str | Path, flag: str) -> Path:
    """Create the folder ``path`` (with its parents) where a run or tool will write, before any work is done.

    Raises:
        RunError: naming ``flag`` (the option that gave the path) and why it cannot be a folder: a file in the way,
            no permission, a read-only file system.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((part for part in (path, *path.parents) if part.exists()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir() else
               f"cannot create the folder: {err.strerror}")
        raise RunError(f"{flag} {path}: {why}; give another path") from None
    return path


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def position_seed(seed: int, *position: int) -> int:
    """The seed of a position in the run, e.g. (rank, epoch) or (rank, epoch, step).

    Re-seeding from where the run is (each epoch for the loader workers, each step for mixup, drop path and
    random erasing) makes every random draw a pure function of the position, so a run restarted from a
    checkpoint, at an epoch's end or inside one, replays what follows exactly as the uninterrupted run did.
    """
    return int(np.random.SeedSequence([seed, *position]).generate_state(1, dtype=np.uint64)[0] % 2**63)


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def image_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an input size given as one side (square inputs) or as (height, width), as DATA.IMG_SIZE
    and the network's ``img_size`` hold it; everything that sizes an input reads it here."""
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
