"""Effective receptive field (ERF) of trained models, measured as RepLKNet's visualize_erf.py and analyze_erf.py do.

    python tools/erf.py --checkpoint CKPT [CKPT|random ...] [--cfg FILE] --data-path DIR [--num-images 50] [--stage 4]
        --output erf.png [--batch-size 8] [--opts KEY VALUE ...] [--device auto|cpu|cuda]

For each model, N validation images of DIR (the dataset root, laid out as the model's DATA.DATASET expects) go
through its evaluation transform, evenly spread over the set so that every class takes part. The contribution score
of an input pixel is the gradient of the centre position of the chosen stage's output, summed over channels, with
respect to that pixel: absolute values summed over the colour channels and averaged over the images (RepLKNet's
meter.avg, so that the picture does not depend on N; RepLKNet clips the centre output and the gradient at 0 where
absolute values count negative contributions too). The map is shown log-scaled, log10(score + 1), and rescaled
to [0, 1]; the high-contribution area ratio at threshold t is the area of the smallest centred square that holds
more than t of the rescaled map's total, over the image's area (RepLKNet's get_rectangle). The squares are
centred at the input pixel nearest the middle of the traced output position's patch; RepLKNet centres them at
(H // 2, W // 2), the same pixel whenever the output side is odd (7x7 at 224). ``random`` is an
untrained model of the config of ``--cfg`` or, without it, of the first checkpoint. The models are drawn side by
side, each with its squares for thresholds 0.2, 0.3, 0.5 and 0.99, and the ratios are printed.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from cli import run_tool  # puts the checkout on the path for the imports below
from model_cli import add_model_arguments, checkpoint_config, device_of, load_for_inference
from torch import nn
from torch.utils.data import DataLoader, Subset
from yacs.config import CfgNode

from checkpoint import load_checkpoint_file
from config import load_config
from data import DeviceLoader, build_dataset
from logger import ProgressLine
from models import build_model
from utils import RunError, image_size, make_folder, seed_everything

RANDOM = "random"
THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


class ERF(NamedTuple):
    """One model's result: its label, the mean contribution score per input pixel (H, W), how many images, and the
    input pixel (row, column) nearest the centre of the traced output position's patch."""

    label: str
    scores: np.ndarray
    images: int
    centre: tuple[int, int]


class Square(NamedTuple):
    """A square window of the map, cut at its edges: first row and column, height, width, and its share of the
    map's area."""

    top: int
    left: int
    height: int
    width: int
    area_ratio: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, several=True)
    parser.add_argument("--data-path", required=True, metavar="DIR", help="dataset root (DATA.DATA_PATH) of the images")
    parser.add_argument("--num-images", type=int, default=50, help="validation images per model (default 50)")
    parser.add_argument("--stage", type=int, default=4, help="the stage whose centre output is traced (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per backward pass (default 8)")
    parser.add_argument("--output", required=True, type=Path, metavar="FILE", help="the PNG to write")
    return parser


def random_model_config(args: argparse.Namespace, opts: list[str]) -> CfgNode:
    """The config of ``random``: ``--cfg``, else the one the first checkpoint carries."""
    if args.cfg:
        return load_config(args.cfg, opts)
    first = next((path for path in args.checkpoint if path != RANDOM), None)
    if first is None:
        raise RunError("'random' needs a config: give --cfg FILE, or a checkpoint beside it to take the config from")
    return checkpoint_config(load_checkpoint_file(first), first, None, opts)


def load_models(args: argparse.Namespace, device: torch.device) -> list[tuple[str, CfgNode, nn.Module]]:
    """(label, config, model in eval mode) for each ``--checkpoint`` entry; --data-path becomes DATA.DATA_PATH."""
    opts = [*args.opts, "DATA.DATA_PATH", args.data_path]
    models = []
    for entry in args.checkpoint:
        if entry == RANDOM:
            config = random_model_config(args, opts)
            seed_everything(config.SEED)
            models.append(("random (untrained)", config, build_model(config).to(device).eval()))
        else:
            config, model, _ = load_for_inference(entry, args.cfg, opts, device)
            models.append(("/".join(Path(entry).parts[-3:]), config, model))
    return models


def stage_output_module(model: nn.Module, stage: int) -> nn.Module:
    """The last block of a stage (1-based), whose output is the stage's output."""
    stages = [name for name, _ in model.named_children() if name.startswith("blocks")]
    if not 1 <= stage <= len(stages):
        raise RunError(f"--stage {stage}: the model has stages 1 to {len(stages)}")
    return getattr(model, f"blocks{stage}")[-1]


def contribution_scores(model: nn.Module, config: CfgNode, stage: int, num_images: int, batch_size: int,
                        device: torch.device, progress: ProgressLine, label: str) -> ERF:
    """The mean over images of |d centre(stage output) / d input| summed over colour channels: (H, W)."""
    dataset = build_dataset(False, config)
    if len(dataset) < num_images:
        print(f"note: {config.DATA.DATA_PATH} holds {len(dataset)} validation images; using all of them")
    chosen = sorted(set(np.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).round().astype(int).tolist()))
    loader = DeviceLoader(DataLoader(Subset(dataset, chosen), batch_size=batch_size,
                                     num_workers=config.DATA.NUM_WORKERS), device)
    model.requires_grad_(False)  # only the input's gradient is needed
    captured: list[torch.Tensor] = []
    hook = stage_output_module(model, stage).register_forward_hook(lambda module, inputs, out: captured.append(out))
    height, width = image_size(config.DATA.IMG_SIZE)
    total = torch.zeros(height, width, dtype=torch.float64, device=device)
    count = 0
    try:
        for batch in loader:
            readable = torch.tensor([not text for text in batch.bad])
            for text in (text for text in batch.bad if text):
                print(f"warning: skipping an unreadable image: {text.splitlines()[0]}", file=sys.stderr)
            images = batch.image[readable].to(device).requires_grad_(True)
            if not len(images):
                continue
            captured.clear()
            model(images)
            output = captured[0]  # (B, C, h, w), channels-last inside the blocks
            rows, columns = output.shape[2:]
            centre = output[:, :, rows // 2, columns // 2].sum()
            (gradient,) = torch.autograd.grad(centre, images)  # (B, 3, H, W); eval mode: each image's own gradient
            total += gradient.abs().sum(dim=(0, 1)).double()
            count += len(images)
            progress.update(f"{label}: {count}/{len(chosen)} images")
    finally:
        hook.remove()
    if count == 0:
        raise RunError(f"no readable validation image in {config.DATA.DATA_PATH}")
    # Output position i covers input rows [i, i + 1) x H / rows (columns: x W / columns); the pixel nearest its middle
    # centres the squares.
    centre = (int((rows // 2 + 0.5) * height / rows), int((columns // 2 + 0.5) * width / columns))
    return ERF(label, (total / count).cpu().numpy(), count, centre)


def rescaled(scores: np.ndarray) -> np.ndarray:
    """log10(scores + 1) divided by its maximum, as RepLKNet's analyze_erf.py: scores differ in magnitude."""
    logged = np.log10(scores + 1)
    if logged.max() <= 0:
        raise RunError("the contribution scores are zero everywhere: the stage's output does not depend on the input")
    return logged / logged.max()


def smallest_square(data: np.ndarray, threshold: float, centre: tuple[int, int]) -> Square:
    """The smallest square of odd side centred at ``centre`` that holds more than ``threshold`` of the map's total
    (RepLKNet's get_rectangle); it grows until it covers the whole map, so every threshold below 1 has one."""
    height, width = data.shape
    total = data.sum()
    for half in range(1, max(height, width) + 1):  # at the end the window holds the whole map
        top, left = max(centre[0] - half, 0), max(centre[1] - half, 0)
        window = data[top:centre[0] + half + 1, left:centre[1] + half + 1]  # cut at the map's edges
        if window.sum() > threshold * total:
            break
    return Square(top, left, *window.shape, window.size / data.size)


def plot(results: Sequence[ERF], stage: int, path: Path) -> None:
    """The rescaled maps side by side, each with its threshold squares and their area ratios."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4.6), squeeze=False)
    styles = ("solid", "dashed", "dashdot", "dotted")
    for ax, result in zip(axes[0], results, strict=True):
        data = rescaled(result.scores)
        # RepLKNet's colour map, centred at 0 as its seaborn heat map is: 0 is yellow, 1 dark green.
        shown = ax.imshow(data, cmap="RdYlGn", vmin=-1, vmax=1)
        lines = []
        for threshold, style in zip(THRESHOLDS, styles, strict=True):
            square = smallest_square(data, threshold, result.centre)
            ax.add_patch(Rectangle((square.left - 0.5, square.top - 0.5), square.width, square.height, fill=False,
                                   color="black", linestyle=style, linewidth=1))
            lines.append(f"t={threshold}: {square.area_ratio:.3f}")
        ax.set_title(f"{result.label}\nstage {stage}, {result.images} images, {data.shape[0]}x{data.shape[1]}",
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.02, "area ratio\n" + "\n".join(lines), transform=ax.transAxes, fontsize=8, va="bottom",
                bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    fig.colorbar(shown, ax=axes[0].tolist(), fraction=0.02, pad=0.02, label="log10(score + 1), rescaled")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.num_images < 1 or args.batch_size < 1:
        raise RunError(f"--num-images and --batch-size must be 1 or more, got {args.num_images} and {args.batch_size}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RunError("drawing the ERF needs matplotlib, which is not installed; pip install matplotlib") from None
    make_folder(args.output.parent, "--output")
    device = device_of(args)
    progress = ProgressLine(enabled=True)
    results = []
    for label, config, model in load_models(args, device):
        stage_output_module(model, args.stage)  # a bad --stage stops before any work
        results.append(contribution_scores(model, config, args.stage, args.num_images, args.batch_size, device,
                                           progress, label))
        progress.clear()
    print(f"high-contribution area ratio (stage {args.stage}): the smallest centred square holding more than t of "
          "the log-scaled map, over the image")
    print(f"{'model':<40} {'images':>6} {'size':>9} " + " ".join(f"{f't={t}':>12}" for t in THRESHOLDS))
    for result in results:
        data = rescaled(result.scores)
        squares = [smallest_square(data, t, result.centre) for t in THRESHOLDS]
        cells = [f"{square.area_ratio:.4f} ({max(square.height, square.width)})" for square in squares]
        print(f"{result.label:<40} {result.images:>6} {f'{data.shape[0]}x{data.shape[1]}':>9} "
              + " ".join(f"{cell:>12}" for cell in cells))
    plot(results, args.stage, args.output)
    print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(main))
