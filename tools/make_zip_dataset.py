"""Pack an image-folder tree (ImageNet's layout) into Swin-Transformer's format, for DATA.ZIP_MODE (--zip).

    python tools/make_zip_dataset.py SRC DST

SRC holds train/<class>/<images> and/or val/<class>/<images>. For each split DST gets <split>.zip, whose
members are the images at their paths under the split folder (<class>/<file>, stored uncompressed: JPEG and
PNG do not compress further, and stored members are read without inflating), and <split>_map.txt, one
"<member>\t<label>" line per image. Images, their order and their labels are exactly those of torchvision's
ImageFolder over the same folder (sorted class folders, the same file extensions), so training on DST with
DATA.ZIP_MODE gives the same batches as on SRC.

SRC is only read. DST must be new or empty, and outside SRC; each archive is written under a temporary name
and renamed when complete, so a finished name is a complete archive.
"""

import argparse
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from cli import run_tool  # puts the checkout on the path for the imports below
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from utils import RunError

SPLITS = ("train", "val")


class PackError(RunError):
    """A refused request, or a file that cannot be read or written."""


def split_samples(split_dir: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(member path, label) of every image of a split folder, in ImageFolder's order, and its class names."""
    try:
        classes, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise PackError(f"{split_dir}: {str(err).rstrip('.')}; expected <class>/<images> folders") from None
    members = []
    for path, label in samples:
        member = Path(path).relative_to(split_dir).as_posix()
        if "\t" in member or "\n" in member or "\r" in member:
            raise PackError(f"{path}: a tab or line break in a file name cannot be written to a map file; rename it")
        members.append((member, label))
    return members, classes


def pack_split(split_dir: Path, dst: Path, split: str) -> tuple[int, int, int]:
    """Write ``dst/<split>.zip`` and ``dst/<split>_map.txt``; returns (images, classes, archive bytes)."""
    samples, classes = split_samples(split_dir)
    archive_path = dst / f"{split}.zip"
    partial = dst / f".{split}.zip.partial"
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, strict_timestamps=False) as archive:
        for member, _ in samples:
            archive.write(split_dir / member, arcname=member)
    map_partial = dst / f".{split}_map.txt.partial"
    map_partial.write_text("".join(f"{member}\t{label}\n" for member, label in samples), encoding="utf-8")
    os.replace(partial, archive_path)
    os.replace(map_partial, dst / f"{split}_map.txt")
    return len(samples), len(classes), archive_path.stat().st_size


def pack(src: Path, dst: Path) -> dict[str, tuple[int, int, int]]:
    """Pack every split of ``src`` into ``dst``; refuses what would touch ``src`` or existing files."""
    if not src.is_dir():
        raise PackError(f"source {src} is not a folder; give a folder holding train/<class>/ and val/<class>/")
    splits = [split for split in SPLITS if (src / split).is_dir()]
    if not splits:
        raise PackError(f"source {src} holds neither train/ nor val/; expected train/<class>/ and val/<class>/")
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve()):
        raise PackError(f"destination {dst} is inside the source {src}; choose a folder outside it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise PackError(f"destination {dst} exists and is not an empty folder; choose a new or empty one")
    dst.mkdir(parents=True, exist_ok=True)
    return {split: pack_split(src / split, dst, split) for split in splits}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="image-folder tree: train/<class>/, val/<class>/")
    parser.add_argument("dst", type=Path, help="new or empty folder for <split>.zip and <split>_map.txt")
    args = parser.parse_args(argv)
    try:
        written = pack(args.src, args.dst)
    except OSError as err:  # an unreadable image or a full disk, say
        raise PackError(str(err)) from err
    for split, (images, classes, size) in written.items():
        archive = args.dst / f"{split}.zip"
        print(f"{split}: {images} images of {classes} classes -> {archive} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
