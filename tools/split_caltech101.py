"""Split Caltech-101's 101_ObjectCategories into train/ and val/ image folders.

    python tools/split_caltech101.py --src 101_ObjectCategories --dst datasets/caltech101_split \
        [--train-ratio 0.8] [--seed 1024] [--mode copy|symlink|hardlink] [--include-background] [--force]

Per class, the file names are sorted and then shuffled with the seed, so the split is the same on every
file system (the release shuffled os.listdir order, which differs between machines); int(n * ratio)
files go to train/<class>/ and the rest to val/<class>/. BACKGROUND_Google is a clutter class, not an
object category, and is left out unless --include-background is given. A manifest (split_manifest.json)
records which file went where; --force may then replace exactly those files, and nothing else.
The source is only read.
"""

import argparse
import json
import os
import random
import shutil
import sys
from collections.abc import Sequence

from cli import run_tool  # puts the checkout on the path for the imports below

from utils import RunError

MANIFEST = "split_manifest.json"
BACKGROUND = "BACKGROUND_Google"
MODES = ("copy", "symlink", "hardlink")


class SplitError(RunError):
    """A bad argument or source tree, or a file that cannot be read or written."""


def plan_split(src: str, train_ratio: float, seed: int, include_background: bool) -> dict[str, dict[str, list[str]]]:
    """Return {class: {"train": [file, ...], "val": [file, ...]}} for the class folders of ``src``."""
    if not 0.0 < train_ratio < 1.0:
        raise SplitError(f"--train-ratio must be between 0 and 1 (exclusive), got {train_ratio}")
    if not os.path.isdir(src):
        raise SplitError(f"source {src} is not a folder; give the extracted 101_ObjectCategories folder")
    classes = sorted(
        name for name in os.listdir(src)
        if os.path.isdir(os.path.join(src, name)) and (include_background or name != BACKGROUND)
    )
    if not classes:
        raise SplitError(f"source {src} holds no class folders; give the extracted 101_ObjectCategories folder")
    plan = {}
    for name in classes:
        folder = os.path.join(src, name)
        files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise SplitError(f"class folder {folder} holds no files; restore it or remove it from the source")
        # A generator per class, seeded by seed and class name: adding or removing a class (the background)
        # leaves the other classes' splits unchanged.
        random.Random(f"{seed}:{name}").shuffle(files)
        cut = int(len(files) * train_ratio)
        if cut == 0 or cut == len(files):  # an empty class folder in a split would stop the data loader later
            raise SplitError(f"class folder {folder} has {len(files)} files, too few to give both splits one at "
                             f"--train-ratio {train_ratio}")
        plan[name] = {"train": files[:cut], "val": files[cut:]}
    return plan


def _place(source: str, target: str, mode: str) -> None:
    """Put ``source`` at ``target`` by copying or linking."""
    if mode == "copy":
        shutil.copy2(source, target)
    elif mode == "symlink":
        os.symlink(os.path.abspath(source), target)
    else:
        os.link(source, target)


def _previous_outputs(dst: str) -> list[str]:
    """Paths (relative to ``dst``) that an earlier run recorded in its manifest."""
    with open(os.path.join(dst, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    paths = [os.path.normpath(os.path.join(split, name, file))
             for name, splits in manifest["classes"].items() for split, files in splits.items() for file in files]
    # The manifest is this tool's own, but never let an edited one reach outside dst.
    return [path for path in paths if path.split(os.sep)[0] in ("train", "val") and ".." not in path.split(os.sep)]


def _clear_previous(dst: str, force: bool) -> None:
    """Refuse a non-empty ``dst``; with ``force``, remove only what an earlier run's manifest lists."""
    if not os.path.exists(dst) or not os.listdir(dst):
        return
    if not force:
        raise SplitError(f"destination {dst} is not empty; choose a new folder, or --force to replace an earlier split")
    if not os.path.isfile(os.path.join(dst, MANIFEST)):
        raise SplitError(f"destination {dst} holds files but no {MANIFEST}; --force only replaces this tool's output")
    for relative in _previous_outputs(dst):
        path = os.path.join(dst, relative)
        if os.path.lexists(path):
            os.remove(path)
    for split in ("train", "val"):  # class folders the earlier run made, if nothing else is in them now
        split_dir = os.path.join(dst, split)
        if os.path.isdir(split_dir):
            for name in os.listdir(split_dir):
                folder = os.path.join(split_dir, name)
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
            if not os.listdir(split_dir):
                os.rmdir(split_dir)
    os.remove(os.path.join(dst, MANIFEST))


def write_split(src: str, dst: str, plan: dict[str, dict[str, list[str]]], mode: str) -> None:
    """Write the manifest, then create ``dst/<split>/<class>/<file>`` for every planned file.

    The manifest comes first so that a run that fails half-way can be replaced with --force.
    """
    os.makedirs(dst, exist_ok=True)
    manifest = {"source": os.path.abspath(src), "mode": mode, "classes": plan}
    with open(os.path.join(dst, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    for name, splits in plan.items():
        for split, files in splits.items():
            folder = os.path.join(dst, split, name)
            os.makedirs(folder, exist_ok=True)
            for file in files:
                _place(os.path.join(src, name, file), os.path.join(folder, file), mode)


def summary(plan: dict[str, dict[str, list[str]]]) -> str:
    """Per-split image and class counts."""
    lines = []
    for split in ("train", "val"):
        count = sum(len(splits[split]) for splits in plan.values())
        lines.append(f"{split}: {count} images in {len(plan)} classes")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Split Caltech-101 into train/ and val/ class folders.")
    parser.add_argument("--src", required=True, help="the extracted 101_ObjectCategories folder (only read)")
    parser.add_argument("--dst", required=True, help="output folder; gets train/<class>/ and val/<class>/")
    parser.add_argument("--train-ratio", type=float, default=0.8, help="share of each class for training")
    parser.add_argument("--seed", type=int, default=1024, help="shuffle seed (the release used 1024)")
    parser.add_argument("--mode", choices=MODES, default="copy", help="copy files, or link to the source")
    parser.add_argument("--include-background", action="store_true", help=f"keep the {BACKGROUND} class")
    parser.add_argument("--force", action="store_true", help="replace the files an earlier run listed in its manifest")
    args = parser.parse_args(argv)
    # Real paths, so that a symbolic link on the way to --dst cannot lead back into the source.
    src_real, dst_real = os.path.realpath(args.src), os.path.realpath(args.dst)
    if dst_real == src_real or dst_real.startswith(src_real + os.sep):
        raise SplitError(f"destination {args.dst} lies inside the source {args.src} (it is {dst_real}); choose a "
                         "folder outside it")
    try:
        plan = plan_split(args.src, args.train_ratio, args.seed, args.include_background)
        _clear_previous(args.dst, args.force)
        write_split(args.src, args.dst, plan, args.mode)
    except OSError as err:  # an unreadable source or unwritable destination, say
        raise SplitError(str(err)) from err
    print(summary(plan))
    print(f"wrote {args.dst} ({args.mode}); manifest: {os.path.join(args.dst, MANIFEST)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
