"""Export a trained model for deployment (ONNX, TorchScript or a torch.export program) and check it against PyTorch.

    python tools/export.py --checkpoint CKPT [--cfg FILE] --format onnx|torchscript|exported --output FILE
        [--batch-size N|dynamic] [--tolerance 1e-3] [--opts KEY VALUE ...] [--device auto|cpu|cuda]

The model is exported in eval mode without gradients, so its hand-written autograd functions (which only speed up
training's backward pass) are replaced by the plain operations they compute. The batch dimension is dynamic by
default; ``--batch-size N`` fixes it. ONNX goes through the current exporter (``torch.onnx.export(dynamo=True)``,
which needs ``onnxscript``), ``exported`` is a ``torch.export`` program saved with ``torch.export.save``, and
TorchScript is a trace (which runs at any batch size). The input is ``images`` (B, 3, H, W), normalised as the
evaluation transform does, and the output ``logits`` (B, classes).

After writing the file the tool loads it back (ONNX with onnxruntime), runs it beside the PyTorch model on random
batches and prints the largest difference of the logits; above ``--tolerance`` it fails with exit status 1.
"""

import argparse
import importlib.util
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from cli import run_tool  # puts the checkout on the path for the imports below
from model_cli import add_model_arguments, device_of, load_for_inference
from torch import nn

from utils import RunError, image_size, make_folder

FORMATS = ("onnx", "torchscript", "exported")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the exporter's and the checker's; pinned in requirements-dev
# Largest absolute difference of the logits accepted between the exported model and PyTorch. Float32 rounding
# through reordered operations stays far below it: 2e-5 for ONNX Runtime on the release's golden model (logits up
# to 22), 0 for TorchScript and torch.export, which run the same kernels.
DEFAULT_TOLERANCE = 1e-3
DYNAMIC = "dynamic"
CHECKED_DYNAMIC_BATCHES = (1, 3)  # other than the example's 2, so that a baked-in batch size would show
EXAMPLE_BATCH = 2  # torch.export specialises batch sizes 0 and 1, so a dynamic batch is traced with 2

Runner = Callable[[torch.Tensor], torch.Tensor]


def batch_size(text: str) -> int | None:
    """``--batch-size``: a positive count, or "dynamic" (None)."""
    if text == DYNAMIC:
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or {DYNAMIC!r}, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--output", required=True, type=Path, metavar="FILE", help="the file to write")
    parser.add_argument("--batch-size", type=batch_size, default=None, metavar="N|dynamic",
                        help="fix the batch dimension to N (default: dynamic)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted |logit difference| from PyTorch (default {DEFAULT_TOLERANCE:g})")
    return parser


def check_onnx_packages() -> None:
    """Stop before any work when a package that ONNX export or its check needs is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise RunError(f"--format onnx needs {', '.join(ONNX_PACKAGES)}; {', '.join(missing)} not installed: "
                       "pip install -r requirements-dev.txt (or pip install onnx onnxscript onnxruntime)")


def export(model: nn.Module, example: torch.Tensor, fmt: str, output: Path, dynamic: bool) -> None:
    """Write ``model`` traced on ``example`` to ``output`` in ``fmt``, with a dynamic batch dimension or not."""
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        # The trace warns that the input-size check becomes a constant (the size is fixed by the model anyway)
        # and that TorchScript is deprecated upstream; neither is news to the user here.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        if fmt == "onnx":
            # One self-contained file: the largest variant's weights (230 MB) are far from protobuf's 2 GB limit.
            torch.onnx.export(model, (example,), str(output), dynamo=True, dynamic_shapes=shapes, external_data=False,
                              input_names=["images"], output_names=["logits"], verbose=False)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), str(output))
        else:
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=shapes), str(output))


def load_exported(fmt: str, output: Path, device: torch.device) -> Runner:
    """The written file as a function of a batch of images, run by what would run it in deployment."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(None, {"images": images.cpu().numpy()})[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit")
        module = torch.jit.load(str(output), map_location=device) if fmt == "torchscript" else (
            torch.export.load(str(output)).module())
    return module


@torch.no_grad()
def largest_difference(model: nn.Module, runner: Runner, batches: Sequence[int], size: tuple[int, int], channels: int,
                       device: torch.device) -> float:
    """The largest |logit difference| between ``model`` and ``runner`` over random batches of the given sizes, of
    images of ``size`` (H, W)."""
    generator = torch.Generator().manual_seed(0)
    difference = 0.0
    for batch in batches:
        images = torch.randn(batch, channels, *size, generator=generator).to(device)
        expected = model(images).float().cpu()
        got = runner(images).float().cpu()
        if got.shape != expected.shape:
            raise RunError(f"the exported model gives logits of shape {tuple(got.shape)} for a batch of {batch}, "
                           f"PyTorch {tuple(expected.shape)}")
        difference = max(difference, (got - expected).abs().max().item())
    return difference


def run(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        check_onnx_packages()
    if args.format == "exported" and args.output.suffix != ".pt2":
        raise RunError(f"--format exported writes a torch.export archive, which torch.export.load reads from a .pt2 "
                       f"file; name the output {args.output.with_suffix('.pt2')}")
    if args.tolerance < 0:
        raise RunError(f"--tolerance must be 0 or more, got {args.tolerance}")
    make_folder(args.output.parent, "--output")
    device = device_of(args)
    config, model, _ = load_for_inference(args.checkpoint, args.cfg, args.opts, device)
    size, channels = image_size(config.DATA.IMG_SIZE), config.MODEL.STRIP_MLP.IN_CHANS
    dynamic = args.batch_size is None
    example = torch.randn(args.batch_size or EXAMPLE_BATCH, channels, *size, device=device)
    start = time.time()
    try:
        export(model, example, args.format, args.output, dynamic)
    except Exception as err:  # the exporters raise many kinds; none is the user's to fix but the report is
        raise RunError(f"exporting to {args.format} failed: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    batches = CHECKED_DYNAMIC_BATCHES if dynamic else (args.batch_size, args.batch_size)
    difference = largest_difference(model, load_exported(args.format, args.output, device), batches, size, channels,
                                    device)
    megabytes = args.output.stat().st_size / 2**20
    print(f"wrote {args.output} ({args.format}, {'dynamic batch' if dynamic else f'batch {args.batch_size}'}, "
          f"{megabytes:.1f} MB) in {time.time() - start:.1f}s")
    print(f"largest |logit difference| from PyTorch over batches of {', '.join(map(str, batches))}: {difference:.3g} "
          f"(tolerance {args.tolerance:g})")
    if difference > args.tolerance:
        raise RunError(f"the exported model differs from PyTorch by {difference:.3g}, more than --tolerance "
                       f"{args.tolerance:g}; {args.output} is kept for inspection, do not deploy it")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(main))
