"""Shared fixtures: the release's golden outputs, and small datasets generated on disk (nothing is downloaded)."""

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import run_dir, write_config, write_image_folder

from models import StripMLPNet

# One compute thread, as the tests' subprocesses have (run_helpers.launch), unless OMP_NUM_THREADS says otherwise:
# the tests' models are tiny, and on two cores shared with other jobs a second thread mostly spins waiting for the
# first (the tiny_run training below took 8 to 20 times as long with two). main.py keeps a count set this way.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CUDA_SKIP_REASON = "needs a CUDA device"


# Every test collected in this session, before `-m` deselects any (tests/test_markers.py reads it).
COLLECTED = pytest.StashKey[list[pytest.Item]]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Record the collected tests; tests marked ``cuda`` skip, all with one reason, where torch sees no CUDA device
    (CI never has one)."""
    config.stash[COLLECTED] = list(items)
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=CUDA_SKIP_REASON))


@pytest.fixture
def ieee_float32():
    """float32 matmuls and convolutions in full precision (no TensorFloat-32, which cuDNN uses for convolutions by
    default and main.py turns on) for the test, so that CUDA results can be held to float32 tolerances."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    yield
    for backend, precision in zip(backends, saved, strict=True):
        backend.fp32_precision = precision


# Copies of shared/spec's golden file (release weights, input, logits, pooled features) and the release's
# state-dict names, kept with the tests so that they run, and never skip, wherever the repository is.
GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "golden_strip_mlp_e40.pt"
RELEASE_NAMES_FILE = Path(__file__).resolve().parent / "golden" / "official_state_dict_e40.txt"


@pytest.fixture(scope="session")
def golden() -> dict:
    """{'config', 'state_dict', 'input', 'logits', 'pooled_features'} of the release's e40 model."""
    return torch.load(GOLDEN_FILE, weights_only=True)


def golden_architecture(golden: dict) -> dict:
    """The constructor keywords of the golden model."""
    config = golden["config"]
    return {key: tuple(config[key]) if key == "layers" else config[key]
            for key in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "layers", "alpha")}


def tiny_model(**kwargs) -> StripMLPNet:
    """A small model built like the golden one: 4 chunks at 40 channels, 2 chunks at 80 and above."""
    return StripMLPNet(**{"img_size": 64, "num_classes": 10, "embed_dim": 40, "layers": (1, 1, 2, 1), **kwargs})


@pytest.fixture(scope="session")
def golden_model(golden: dict) -> StripMLPNet:
    """The golden model with the release's weights, in eval mode (deep-copy it before changing it)."""
    model = StripMLPNet(**golden_architecture(golden))
    model.load_state_dict(golden["state_dict"], strict=True)
    return model.eval()


def write_images(folder: Path, count: int, size: tuple[int, int], fmt: str, seed: int) -> list[Path]:
    """Write ``count`` random RGB images of ``size`` (width, height) as PNG or JPEG files into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img_{i:03d}.{fmt.lower().replace('jpeg', 'jpg')}"
        Image.fromarray(pixels).save(path, format=fmt)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: an ImageFolder root with train/<class>/ and val/<class>/ of generated images.

    ``counts`` maps each class to its (train, val) image counts.
    """

    def make(counts: dict[str, tuple[int, int]], size: tuple[int, int] = (40, 30), fmt: str = "PNG",
             name: str = "folder") -> Path:
        root = tmp_path / name
        for seed, (label, (n_train, n_val)) in enumerate(sorted(counts.items())):
            write_images(root / "train" / label, n_train, size, fmt, seed)
            write_images(root / "val" / label, n_val, size, fmt, seed + 1000)
        return root

    return make


@pytest.fixture
def cifar_root(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a folder holding CIFAR-10 or CIFAR-100 in torchvision's on-disk (python pickle) format.

    ``per_file`` images go into each of the five training batches (CIFAR-10) or the one training file
    (CIFAR-100), and into the test file; labels cycle through the classes.
    """

    def make(kind: str = "cifar10", per_file: int = 4) -> Path:
        root = tmp_path / kind
        rng = np.random.default_rng(0)
        if kind == "cifar10":
            folder, label_key, num_classes = root / "cifar-10-batches-py", "labels", 10
            files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
            meta_file, meta = "batches.meta", {"label_names": [f"class{i}" for i in range(10)]}
        else:
            folder, label_key, num_classes = root / "cifar-100-python", "fine_labels", 100
            files = ["train", "test"]
            meta_file, meta = "meta", {"fine_label_names": [f"class{i:02d}" for i in range(100)]}
        folder.mkdir(parents=True)
        for name in files:
            entry = {
                "data": rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8),  # rows of R, G, B planes
                label_key: [i % num_classes for i in range(per_file)],
            }
            with open(folder / name, "wb") as f:
                pickle.dump(entry, f)
        with open(folder / meta_file, "wb") as f:
            pickle.dump(meta, f)
        return root

    return make


@pytest.fixture
def caltech_source(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a fake 101_ObjectCategories tree with ``counts[class]`` small JPEGs per class folder."""

    def make(counts: dict[str, int], name: str = "101_ObjectCategories") -> Path:
        root = tmp_path / name
        for seed, (label, count) in enumerate(sorted(counts.items())):
            write_images(root / label, count, (12, 10), "JPEG", seed)
        return root

    return make


class TinyRun(NamedTuple):
    """A trained model for the tools' tests: its data root (train/ and val/ of class_0..2), its run folder and the
    checkpoint (which carries the config and the class names)."""

    images: Path
    run: Path
    checkpoint: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """A tiny model (32 px, embed 8, one block per stage) trained in-process for 2 epochs on 3 generated classes of
    8 training and 5 validation images each; it learns them (100% on validation)."""
    import main

    root = tmp_path_factory.mktemp("tiny_run")
    images = write_image_folder(root / "images")
    assert main.main(["--cfg", str(write_config(root / "config.yaml", images, root / "out"))]) == 0
    return TinyRun(images, run_dir(root / "out"), run_dir(root / "out") / "best.pth")
