"""A published model's folder, as ``tools/publish.py`` writes it and timm's ``local-dir:`` loader reads it.

The folder holds ``model.safetensors`` (tensors only: reading it runs no code, unlike a pickle), ``config.json``
(timm's format: the architecture's name, its constructor arguments ``model_args`` and ``pretrained_cfg``) and a
model card. ``hubconf.py`` and the training code read it through these functions, which need torch and safetensors
alone.
"""

import json
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"  # the name timm's local-dir loader looks for first
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU.

    Raises:
        safetensors.SafetensorError: the file is not a whole safetensors file.
        OSError: it cannot be read.
    """
    import safetensors.torch  # here, so that building a network (hubconf.py) never needs it

    return safetensors.torch.load_file(str(path), device="cpu")


def saved_arguments(folder: str | Path, architecture: str) -> dict:
    """The constructor arguments a published folder's ``config.json`` records for its weights.

    Raises:
        ValueError: the folder has no ``config.json``, or it publishes another architecture (naming it).
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{folder} holds no {CONFIG_FILE}: give a folder that tools/publish.py wrote")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config["architecture"] != architecture:
        raise ValueError(f"{folder} publishes {config['architecture']}, not {architecture}: load it with the "
                         f"{config['architecture']!r} entry point")
    return dict(config["model_args"])
