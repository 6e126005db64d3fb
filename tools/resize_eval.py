"""Accuracy of a trained model at other input sizes: its size-dependent weights resampled (as every loader in this
repository does) against the naive alternative (those weights re-initialised, everything else kept).

    python tools/resize_eval.py --checkpoint CKPT [--cfg FILE] --sizes SIZE [SIZE ...] [--opts KEY VALUE ...]
        [--device auto|cpu|cuda]

SIZE is what DATA.IMG_SIZE takes (``96``, or ``[96, 128]``). Each size is evaluated on the validation split of the
checkpoint's dataset (``--opts DATA.DATA_PATH DIR`` to point elsewhere) with the evaluation transform at that size,
after one row at the size the model was trained for; the table is printed in Markdown.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

import torch
from cli import run_tool  # puts the checkout on the path for the imports below
from model_cli import add_model_arguments, checkpoint_config, device_of, eval_settings

from checkpoint import check_class_names, load_checkpoint_file
from data import build_dataset, build_loader, build_scoring, model_classes
from engine import validate
from models import build_model, checkpoint_filter_fn, clean_state_dict
from utils import image_size, seed_everything

METHODS = ("resampled", "re-initialised")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--sizes", nargs="+", required=True, metavar="SIZE",
                        help="input sizes to evaluate at, as DATA.IMG_SIZE takes them: 96, or [96, 128]")
    return parser


def fitted_weights(weights: dict[str, torch.Tensor], model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights for ``model``: resampled, or with every tensor of another shape left as the model's
    fresh initialisation."""
    if method == "resampled":
        return checkpoint_filter_fn(weights, model, log=lambda note: None)
    fresh = model.state_dict()
    return {name: tensor if tensor.shape == fresh[name].shape else fresh[name] for name, tensor in weights.items()}


@torch.no_grad()
def resize_eval(args: argparse.Namespace) -> int:
    device = device_of(args)
    checkpoint = load_checkpoint_file(args.checkpoint)
    weights = clean_state_dict(checkpoint)
    trained = checkpoint_config(checkpoint, args.checkpoint, args.cfg, args.opts)
    reference = image_size(trained.DATA.IMG_SIZE)
    check_class_names(checkpoint, model_classes(build_dataset(False, trained)), args.checkpoint)  # permuted labels
    print(f"| input size | scale | {' | '.join(f'top-1 {method}' for method in METHODS)} |")
    print(f"|---|---|{'---|' * len(METHODS)}")
    for size in [str(list(reference)), *args.sizes]:
        config = checkpoint_config(checkpoint, args.checkpoint, args.cfg, [*args.opts, "DATA.IMG_SIZE", size])
        height, width = image_size(config.DATA.IMG_SIZE)
        loaders = build_loader(config, 0, 1, train=False, device=device)
        scoring = build_scoring(loaders.dataset_val, device)  # a robustness test set's own rule
        settings = eval_settings(config, device)
        accuracies = []
        for method in METHODS:
            seed_everything(config.SEED)  # the same fresh initialisation for every size and method
            model = build_model(config)
            model.load_state_dict(fitted_weights(weights, model, method))
            accuracies.append(validate(model.to(device), loaders.loader_val, settings, logging.Logger("resize_eval"),
                                       scoring=scoring)["acc1"])
        scale = f"{height / reference[0]:g}" if height * reference[1] == width * reference[0] else \
            f"{height / reference[0]:g} x {width / reference[1]:g}"
        print(f"| {height}x{width} | {scale} | {' | '.join(f'{acc:.2f}' for acc in accuracies)} |", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return resize_eval(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(main))
