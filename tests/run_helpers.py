"""Small generated data and configs for the end-to-end tests of the training engine."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from yacs.config import CfgNode

from data import Sample

REPO = Path(__file__).resolve().parents[1]


def write_image_folder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 5,
                       size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder root with ``train/`` and ``val/``; each class is a noisy image of its own colour."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([255 * (c % 3 == 0), 255 * (c % 3 == 1), 255 * (c % 3 == 2)])
            for i in range(count):
                pixels = np.clip(colour * 0.7 + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_config(path: Path, data_path: Path, output: Path, extra: dict | None = None) -> Path:
    """A tiny-model config (embed 8, one block per stage, 32 px) with every random augmentation on."""
    config = {
        "DATA": {"DATASET": "folder", "DATA_PATH": str(data_path), "IMG_SIZE": 32, "BATCH_SIZE": 4,
                 "NUM_WORKERS": 0},
        "MODEL": {"NAME": "tiny", "NUM_CLASSES": 3, "DROP_PATH_RATE": 0.1,
                  "STRIP_MLP": {"EMBED_DIM": 8, "LAYERS": [1, 1, 1, 1]}},
        "TRAIN": {"EPOCHS": 2, "WARMUP_EPOCHS": 1, "LR_SCALING": "none", "BASE_LR": 1e-3, "WARMUP_LR": 1e-5,
                  "MIN_LR": 1e-5},
        # timm's "inc1" posterize can ask Pillow 13 for 0 bits and crash; the plain policy is as random.
        "AUG": {"AUTO_AUGMENT": "rand-m9-mstd0.5"},
        "OUTPUT": str(output),
        "TAG": "run",
        "DEVICE": "cpu",
        "SAVE_FREQ": 1,
        "PRINT_FREQ": 2,
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(output: Path) -> Path:
    """Where a run of :func:`write_config`'s config writes (OUTPUT/MODEL.NAME/TAG)."""
    return output / "tiny" / "run"


def launch(args: list[str], nproc: int = 0, timeout: float = 300, script: Path = REPO / "main.py",
           **popen) -> subprocess.CompletedProcess:
    """Run ``script`` (``main.py``) in a fresh interpreter (under torchrun with ``nproc`` processes when given)."""
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc else [sys.executable])
    popen.setdefault("env", {**os.environ, "OMP_NUM_THREADS": "1"})
    return subprocess.run([*prefix, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          **popen)


def plain(text: str) -> str:
    """``text`` without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def sample_batch(images: torch.Tensor, targets: torch.Tensor, bad: tuple[str, ...] | None = None) -> Sample:
    """A batch as the data loaders give it; ``bad`` marks samples that replace unreadable files."""
    return Sample(images, targets, torch.arange(len(targets)), bad or ("",) * len(targets))


def release_config() -> CfgNode:
    """The yacs node the release pickled with its checkpoints (Swin's layout, abridged)."""
    node = CfgNode()
    node.MODEL = CfgNode({"TYPE": "strip_mlp", "NAME": "strip_mlp_tiny", "DROP_PATH_RATE": 0.1})
    node.TRAIN = CfgNode({"EPOCHS": 300, "BASE_LR": 5e-4, "WARMUP_EPOCHS": 20, "WEIGHT_DECAY": 0.05,
                          "OPTIMIZER": CfgNode({"NAME": "adamw", "BETAS": (0.9, 0.999)})})
    node.AMP_OPT_LEVEL = "O1"
    node.freeze()
    return node
