"""Classify images with a trained model: the top-k classes and probabilities of each image.

    python tools/predict.py --checkpoint CKPT [--cfg FILE] [--topk 5] [--batch-size N] [--output FILE.csv|FILE.json]
        [--opts KEY VALUE ...] [--device auto|cpu|cuda] PATH...

PATH is an image file, a folder (searched recursively) or a glob. Images go through the model's evaluation
transform in batches, exactly as ``main.py --eval`` sees them, so a folder's predictions are the ones its
evaluation counts. Class names come from the checkpoint (training stores the dataset's); a 1000-class checkpoint
without them (the release's) uses ImageNet-1K's names. A file that cannot be read is reported with its reason and
the others are still predicted; the exit status is 1 only when no image could be predicted. Give the PATHs before
``--opts``, which takes every word after it.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from cli import run_tool  # puts the checkout on the path for the imports below
from model_cli import add_model_arguments, device_of, eval_settings, load_for_inference
from torch.utils.data import DataLoader

from data import DeviceLoader, ImageFiles, build_transform, find_images
from engine import eval_logits
from logger import ProgressLine
from reports import top_k, topk_entries, topk_fields, write_csv
from utils import RunError, image_size, make_folder

OUTPUT_FORMATS = (".csv", ".json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    parser.add_argument("--topk", type=int, default=5, help="classes to show per image (at most the class count)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: DATA.BATCH_SIZE)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="also write the predictions to a .csv or .json")
    return parser


@torch.no_grad()
def predict(args: argparse.Namespace) -> int:
    if args.output is not None:
        if args.output.suffix.lower() not in OUTPUT_FORMATS:
            raise RunError(f"--output {args.output}: expected a file name ending in .csv or .json")
        if args.output.is_dir():
            raise RunError(f"--output {args.output} is a folder; give a file name ending in .csv or .json")
        make_folder(args.output.parent, "--output")  # before the predictions, not after them
    if args.topk < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise RunError(f"--topk and --batch-size must be 1 or more, got {args.topk} and {args.batch_size}")
    files, empty = find_images(args.paths)
    for pattern, reason in empty:
        print(f"warning: {pattern}: {reason}", file=sys.stderr)
    if not files:
        raise RunError(f"no image files found in {' '.join(args.paths)}; give image files, folders or globs")

    device = device_of(args)
    config, model, classes = load_for_inference(args.checkpoint, args.cfg, args.opts, device)
    settings = eval_settings(config, device)
    input_shape = (config.MODEL.STRIP_MLP.IN_CHANS, *image_size(config.DATA.IMG_SIZE))
    dataset = ImageFiles(files, build_transform(False, config), input_shape)
    loader = DeviceLoader(DataLoader(dataset, batch_size=args.batch_size or config.DATA.BATCH_SIZE,
                                     num_workers=config.DATA.NUM_WORKERS), device)
    k = min(args.topk, len(classes))
    rows: list[dict] = []
    progress = ProgressLine(enabled=True)
    for batch in loader:
        indices, probabilities = top_k(eval_logits(model, batch.image, settings), k)
        for index, bad, best, chances in zip(batch.index.tolist(), batch.bad, indices.tolist(),
                                             probabilities.tolist(), strict=True):
            row = {"path": files[index], **(topk_entries(classes, best, chances) if not bad else {}), "error": bad}
            rows.append(row)
            if bad:
                print(f"warning: cannot read {files[index]}: {bad}", file=sys.stderr)
            else:
                shown = ", ".join(f"{row[f'class_{r}']} {row[f'prob_{r}']:.4f}" for r in range(1, k + 1))
                progress.clear()
                print(f"{files[index]}: {shown}")
        progress.update(f"predicted {len(rows)}/{len(files)} images")
    progress.clear()

    rows += [{"path": pattern, "error": reason} for pattern, reason in empty]
    predicted = sum(not row["error"] for row in rows)
    if args.output is not None:
        write_rows(args.output, rows, k)
        print(f"wrote {args.output}")
    if not predicted:
        raise RunError(f"none of the {len(files)} files could be read as an image")
    unreadable = len(files) - predicted
    print(f"predicted {predicted} images" + (f"; {unreadable} could not be read" if unreadable else ""))
    return 0


def write_rows(path: Path, rows: Sequence[dict], k: int) -> None:
    """CSV (path, class_1, prob_1, ..., class_k, prob_k, error) or JSON (a list of objects with those fields)."""
    fields = ["path", *topk_fields(k), "error"]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([{field: row.get(field) for field in fields} for row in rows], indent=1) + "\n")
    else:
        write_csv(path, fields, rows)


def main(argv: Sequence[str] | None = None) -> int:
    return predict(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(main))
