"""What the tools around a trained model share: their command line (which checkpoint, which config, which device)
and the model loader.

Every such tool reads the model's config from the checkpoint (ours carry it as YAML) unless ``--cfg`` names one
(the release's checkpoints carry none of ours), and applies ``--opts KEY VALUE ...`` as ``main.py`` does.
"""

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cli  # noqa: F401  (puts the checkout on the path for the imports below)
import torch
from timm.data import ImageNetInfo
from torch import nn
from yacs.config import CfgNode

from checkpoint import CheckpointError, fit_state_dict, load_checkpoint_file
from config import DEVICES, config_from_text, load_config
from distributed import DistEnv, resolve_device
from engine import StepSettings
from models import build_model


class Inference(NamedTuple):
    """A model ready to predict: its config, the model in eval mode on its device, and its class names."""

    config: CfgNode
    model: nn.Module
    classes: list[str]


def add_model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--checkpoint`` (one, or several when ``several``; ``--resume`` is its former name), ``--cfg``, ``--opts``
    and ``--device``."""
    parser.add_argument("--checkpoint", "--resume", dest="checkpoint", required=True, nargs="+" if several else None,
                        metavar="CKPT", help=("checkpoint(s) to load" if several else "checkpoint to load")
                        + ": ours, or the release's with --cfg (--resume: its former name)")
    parser.add_argument("--cfg", metavar="FILE",
                        help="config of the model (default: the one the checkpoint carries); needed for the "
                             "release's checkpoints, e.g. configs/imagenet1k/strip_mlp_tiny.yaml")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="override config keys as main.py does, e.g. --opts DATA.NUM_WORKERS 0")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: CUDA when present)")


def device_of(args: argparse.Namespace) -> torch.device:
    """The device ``--device`` names; asking for CUDA without one is a RunError."""
    return resolve_device(args.device, 0)


def eval_settings(config: CfgNode, device: torch.device) -> StepSettings:
    """How ``engine.validate`` would run this config on one process: precision and memory format."""
    return StepSettings.from_config(config, DistEnv(rank=0, world_size=1, local_rank=0, device=device))


def checkpoint_class_names(checkpoint: Mapping[str, Any], num_classes: int) -> list[str]:
    """The class names a checkpoint carries; for a 1000-class one without them (the release's), ImageNet-1K's
    names as timm ships them; otherwise the class indices."""
    names = checkpoint.get("classes")
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == 1000:
        return [description.split(",")[0] for description in ImageNetInfo().label_descriptions()]
    return [str(index) for index in range(num_classes)]


def checkpoint_config(checkpoint: Mapping[str, Any], source: str, cfg_file: str | None = None,
                      opts: Sequence[str] = ()) -> CfgNode:
    """The config of a trained model: ``cfg_file`` when given, else the config the checkpoint carries (ours
    save it as YAML); ``opts`` (KEY VALUE pairs) override either.

    Raises:
        CheckpointError: no ``cfg_file`` and the checkpoint carries no config of ours (the release's do not).
    """
    if cfg_file:
        return load_config(cfg_file, opts)
    if not isinstance(checkpoint.get("config"), str):
        raise CheckpointError(f"{source} carries no config of this repository (a release checkpoint?); give --cfg "
                              "naming its variant and dataset, e.g. configs/imagenet1k/strip_mlp_tiny.yaml")
    return config_from_text(checkpoint["config"], source, opts)


def load_for_inference(path: str | Path, cfg_file: str | None = None, opts: Sequence[str] = (),
                       device: str | torch.device = "cpu") -> Inference:
    """Build the model a checkpoint (ours or the release's) holds, with its weights, in eval mode on ``device``.

    Raises:
        CheckpointError: unreadable file, no config to build the model from, or weights that do not fit it.
        ConfigError: a bad ``cfg_file`` or ``opts``.
    """
    checkpoint = load_checkpoint_file(path)
    config = checkpoint_config(checkpoint, str(path), cfg_file, opts)
    model = build_model(config)
    model.load_state_dict(fit_state_dict(checkpoint, model, str(path)))
    return Inference(config, model.to(device).eval(), checkpoint_class_names(checkpoint, config.MODEL.NUM_CLASSES))
