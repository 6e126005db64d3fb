"""The demo dataset: scikit-learn's 1,797 handwritten digits written as PNG image folders.

scikit-learn ships these real 8x8 scans inside its package, so the demo runs on a fresh machine without
downloading anything. They are upscaled to ``side`` pixels, stored as RGB, and split per class with a fixed
seed into ``train/<digit>/`` and ``val/<digit>/``.
"""

import json
import os
import random
import shutil

import numpy as np
from PIL import Image

from .datasets import DataError

# Written last into a finished demo folder; its presence is what marks the folder as ours and complete.
MARKER = "demo_digits.json"


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) with values 0..16, labels (N,)) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the demo dataset needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    return digits.images, digits.target


def _split(labels: np.ndarray, train_ratio: float, seed: int) -> dict[str, list[int]]:
    """Sample indices per split: each class's indices shuffled with ``seed``, int(n * ratio) to train."""
    rng = random.Random(seed)
    splits: dict[str, list[int]] = {"train": [], "val": []}
    for label in sorted(set(labels.tolist())):
        indices = sorted(np.flatnonzero(labels == label).tolist())
        rng.shuffle(indices)
        cut = int(len(indices) * train_ratio)
        splits["train"] += indices[:cut]
        splits["val"] += indices[cut:]
    return splits


def make_demo_digits(dst: str, side: int = 32, train_ratio: float = 0.8, seed: int = 0) -> bool:
    """Write the demo image folders to ``dst`` unless they are already there; return True if written.

    The folders are built next to ``dst`` and renamed into place, so an interrupted run leaves no
    half-written dataset and concurrent processes (one per GPU) cannot mix their files.
    A ``dst`` that exists without the marker, or with one for other settings, is refused, not changed.
    """
    settings = {"side": side, "train_ratio": train_ratio, "seed": seed}
    marker = os.path.join(dst, MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            found = json.load(f)["settings"]
        if found != settings:
            raise DataError(f"{dst} holds demo digits made with {found}, not {settings}; choose another folder")
        return False
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise DataError(f"{dst} exists and is not a demo dataset written by this tool; choose an empty or new folder")

    images, labels = _digits()
    staging = f"{os.path.normpath(dst)}.partial-{os.getpid()}"
    counts: dict[str, dict[str, int]] = {}
    for split, indices in _split(labels, train_ratio, seed).items():
        counts[split] = {}
        for index in indices:
            label = str(int(labels[index]))
            folder = os.path.join(staging, split, label)
            os.makedirs(folder, exist_ok=True)
            pixels = np.round(images[index] * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
            picture = Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC)
            picture.convert("RGB").save(os.path.join(folder, f"{index:04d}.png"))
            counts[split][label] = counts[split].get(label, 0) + 1
    with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
        json.dump({"source": "sklearn.datasets.load_digits", "settings": settings, "counts": counts}, f, indent=1)

    if os.path.isdir(dst) and not os.listdir(dst):
        os.rmdir(dst)  # an empty folder the user made for it; rename needs the name free
    try:
        os.rename(staging, dst)
    except OSError:
        shutil.rmtree(staging)  # our own staging copy; another process finished first
        if not os.path.isfile(marker):
            raise
        return False
    return True
