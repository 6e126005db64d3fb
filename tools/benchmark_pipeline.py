"""Input-pipeline speed: training images/s per loader worker, this repository's pipeline against the release's.

    python tools/benchmark_pipeline.py [--images 160] [--img-size 224] [--rounds 9] [--workers 1] [--stages]

The images are JPEGs of 400-800 px (longer side, quality 75-95, aspect 3:4 to 4:3), cut and scaled at run time
from the colour photographs scikit-image ships (nothing is downloaded), in ImageNet's train/<class>/ layout.
Both pipelines read the same files, in the same order, through a DataLoader with ``--workers`` worker
processes (default 1: one process, one thread, so images/s is what one loader worker delivers):

- release: ImageFolder decoding each file in full, then timm's create_transform as the release built it
  (RandomResizedCrop bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, ToTensor, Normalize, RandomErasing 0.25
  pixel) on the host, giving float32 batches;
- ours: ``data.build_dataset``'s training split (decoding crop, same augmentations, uint8 batches). The
  device-side steps (float conversion, normalisation, random erasing: ``data.DeviceLoader``) run on the GPU
  and are not timed.

Rounds alternate between the two (release first), one pass over the images each; a round's rate counts the
images after the first batch over the time from the first batch to the last, so worker start-up is left out.
Reported: median, min and max images/s of each, and the median of the per-round ratios. ``--stages`` also
times each step of both transforms in this process, one thread, image by image with the same seeds.
"""

import argparse
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from cli import ROOT, run_tool  # puts the checkout on the path for the imports below
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from config import load_config
from data import TrainSampler, build_dataset
from data.datasets import load_rgb_image, read_image
from utils import RunError, image_size, make_folder

# scikit-image's colour photographs (shipped inside its package; no download).
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")


def photographs() -> list[Image.Image]:
    try:
        from skimage import data as skdata
    except ImportError:
        raise RunError("the benchmark makes its JPEGs from scikit-image's photographs: "
                       "pip install -r requirements-dev.txt") from None
    pictures = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in PHOTOS]
    return pictures + [Image.fromarray(view) for view in skdata.stereo_motorcycle()[:2]]


def write_jpegs(root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of 400-800 px in ``root/train/<photo>/``: a random crop of aspect 3:4 to 4:3 of a photo,
    resized (Lanczos) to a longer side of 400-800 px, saved at quality 75-95."""
    rng = np.random.default_rng(seed)
    pictures = photographs()
    paths = []
    for i in range(count):
        picture = pictures[i % len(pictures)]
        aspect = rng.uniform(3 / 4, 4 / 3)
        width = min(picture.width, int(picture.height * aspect))
        height = min(picture.height, int(width / aspect))
        left, top = rng.integers(0, picture.width - width + 1), rng.integers(0, picture.height - height + 1)
        longer = rng.integers(400, 801)
        scale = longer / max(width, height)
        image = picture.crop((left, top, left + width, top + height)).resize(
            (round(width * scale), round(height * scale)), Image.Resampling.LANCZOS)
        folder = root / "train" / f"photo_{i % len(pictures)}"
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i:04d}.jpg")
        image.save(paths[-1], quality=int(rng.integers(75, 96)))
    return paths


def release_transform(config: object) -> Callable:
    """The release's training transform, as data/transforms.py built it before the device-side step."""
    aug = config.AUG
    return create_transform(
        input_size=image_size(config.DATA.IMG_SIZE),
        is_training=True,
        color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
        auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT != "none" else None,
        hflip=aug.HFLIP,
        re_prob=aug.REPROB,
        re_mode=aug.REMODE,
        re_count=aug.RECOUNT,
        interpolation=config.DATA.INTERPOLATION,
    )


class Pipeline:
    """One of the two pipelines: its dataset and the sampler order it reads in."""

    def __init__(self, name: str, dataset: object, order: Callable[[int], Sequence]) -> None:
        self.name = name
        self.dataset = dataset
        self.order = order

    def images_per_second(self, epoch: int, batch_size: int, workers: int) -> float:
        loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.order(epoch), num_workers=workers,
                            drop_last=True)
        batches = iter(loader)
        next(batches)
        start, images = time.perf_counter(), 0
        for batch in batches:
            images += len(batch[1])
        return images / (time.perf_counter() - start)


def pipelines(root: Path, img_size: int) -> tuple[Pipeline, Pipeline, object]:
    """(release, ours, config) over the training folder under ``root``."""
    classes = len(list((root / "train").iterdir()))
    config = load_config(str(ROOT / "configs" / "imagenet1k" / "strip_mlp_tiny.yaml"), [
        "DATA.DATASET", "folder", "DATA.DATA_PATH", str(root), "MODEL.NUM_CLASSES", str(classes),
        "DATA.IMG_SIZE", str(img_size)])
    ours = build_dataset(True, config)
    sampler = TrainSampler(len(ours), rank=0, world_size=1, seed=config.SEED)

    def keys(epoch: int) -> list:
        sampler.set_epoch(epoch)
        return list(sampler)

    release = ImageFolder(str(root / "train"), transform=release_transform(config), loader=load_rgb_image)
    return (Pipeline("release", release, lambda epoch: [key.index for key in keys(epoch)]),
            Pipeline("ours", ours, keys), config)


def stage_times(root: Path, config: object, repeats: int) -> dict[str, dict[str, float]]:
    """ms per image of reading and of each transform step, for both pipelines, with the same seed per image."""
    files = sorted((root / "train").rglob("*.jpg"))
    release_steps = release_transform(config).transforms
    ours = build_dataset(True, config).base.transform.transforms
    times: dict[str, dict[str, float]] = {"release": collections.defaultdict(float),
                                          "ours": collections.defaultdict(float)}
    for name, read, steps in (("release", load_rgb_image, release_steps), ("ours", read_image, ours)):
        for repeat in range(repeats):
            for i, path in enumerate(files):
                random.seed(repeat * len(files) + i)
                np.random.seed(repeat * len(files) + i)
                torch.manual_seed(repeat * len(files) + i)
                start = time.perf_counter()
                image = read(str(path))
                times[name][f"read ({read.__name__})"] += time.perf_counter() - start
                for step in steps:
                    start = time.perf_counter()
                    image = step(image)
                    times[name][getattr(step, "__name__", type(step).__name__)] += time.perf_counter() - start
    count = repeats * len(files)
    return {name: {step: 1000 * seconds / count for step, seconds in steps.items()} for name, steps in times.items()}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160, help="JPEGs to make (one pass over them per round)")
    parser.add_argument("--img-size", type=int, default=224, help="training input side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes (0: in this process)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per pipeline, alternating")
    parser.add_argument("--stages", action="store_true", help="also time each transform step, in this process")
    parser.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.images < 2 * args.batch_size:
        parser.error(f"--images {args.images} must be at least twice --batch-size {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json is not None:
        make_folder(args.json.parent, "--json")  # before the work, not after it
    torch.set_num_threads(1)  # as in a loader worker, for --workers 0 and --stages
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        sizes = [Image.open(path).size for path in write_jpegs(root, args.images)]
        release, ours, config = pipelines(root, args.img_size)
        rates: dict[str, list[float]] = {"release": [], "ours": []}
        for round_ in range(args.rounds):
            for pipeline in (release, ours):
                rates[pipeline.name].append(pipeline.images_per_second(round_, args.batch_size, args.workers))
        stages = stage_times(root, config, repeats=1) if args.stages else None
    ratios = [a / b for a, b in zip(rates["ours"], rates["release"], strict=True)]
    result = {
        "cpu": cpu_model(), "torch": torch.__version__, "images": args.images, "img_size": args.img_size,
        "batch_size": args.batch_size, "workers": args.workers, "rounds": args.rounds,
        "image_sides": [min(min(s) for s in sizes), max(max(s) for s in sizes)],
        **{f"{name}_img_s_{stat}": fn(values) for name, values in rates.items()
           for stat, fn in (("median", statistics.median), ("min", min), ("max", max))},
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "stages_ms": stages,
    }
    print(f"{result['cpu']}, torch {result['torch']}; {args.images} JPEGs of {result['image_sides'][0]}-"
          f"{result['image_sides'][1]} px at {args.img_size}, {args.workers} worker(s), {args.rounds} rounds")
    for name in rates:
        print(f"{name:>8}: {result[f'{name}_img_s_median']:7.1f} images/s per worker "
              f"(min {result[f'{name}_img_s_min']:.1f}, max {result[f'{name}_img_s_max']:.1f})")
    print(f"ours / release = {result['ratio_median']:.2f}x (median of paired rounds; "
          f"{result['ratio_min']:.2f}-{result['ratio_max']:.2f})")
    for name, steps in (stages or {}).items():
        print(f"{name} ms per image: " + ", ".join(f"{step} {ms:.2f}" for step, ms in steps.items())
              + f"; total {sum(steps.values()):.2f}")
    if args.json is not None:
        with args.json.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
