"""The command line that the tools around a trained model share: which checkpoint, which config, which device, and
errors as one line.

Every such tool reads the model's config from the checkpoint (ours carry it as YAML) unless ``--cfg`` names one
(the release's checkpoints carry none of ours), applies ``--opts KEY VALUE ...`` as ``main.py`` does, and turns a
user-facing error (:class:`utils.RunError`) into ``error: ...`` on stderr and exit status 1.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from yacs.config import CfgNode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import Inference, load_for_inference  # noqa: E402  (the repository is on the path only now)
from config import DEVICES  # noqa: E402
from distributed import DistEnv, resolve_device  # noqa: E402
from engine import StepSettings  # noqa: E402
from utils import RunError  # noqa: E402


def add_model_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--resume`` (one checkpoint, or several when ``several``), ``--cfg``, ``--opts`` and ``--device``."""
    parser.add_argument("--resume", required=True, nargs="+" if several else None, metavar="CKPT",
                        help="checkpoint(s) to load: ours, or the release's with --cfg" if several else
                        "checkpoint to load: ours, or the release's with --cfg")
    parser.add_argument("--cfg", metavar="FILE",
                        help="config of the model (default: the one the checkpoint carries); needed for the "
                             "release's checkpoints, e.g. configs/imagenet1k/strip_mlp_tiny.yaml")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="override config keys as main.py does, e.g. --opts DATA.NUM_WORKERS 0")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: CUDA when present)")


def device_of(args: argparse.Namespace) -> torch.device:
    """The device ``--device`` names; asking for CUDA without one is a RunError."""
    return resolve_device(args.device, 0)


def load_model(path: str, args: argparse.Namespace, device: torch.device) -> Inference:
    """The checkpoint's model in eval mode on ``device``, its config (``--cfg``/``--opts`` applied) and class names."""
    return load_for_inference(path, args.cfg, args.opts, device)


def eval_settings(config: CfgNode, device: torch.device) -> StepSettings:
    """How ``engine.validate`` would run this config on one process: precision and memory format."""
    return StepSettings.from_config(config, DistEnv(rank=0, world_size=1, local_rank=0, device=device))


def run_tool(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run ``body``; a RunError becomes one line on stderr and exit status 1."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
