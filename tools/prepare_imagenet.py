"""Sort ImageNet-1K's flat validation folder into the class folders that DATA.DATASET imagenet reads.

    python tools/prepare_imagenet.py --val DIR (--devkit ILSVRC2012_devkit_t12.tar.gz | --labels LOC_val_solution.csv)
        [--mode move|symlink|copy] [--dst DIR]

The official validation set is one folder of 50,000 files ILSVRC2012_val_00000001.JPEG ...; a codebase that reads
it as an image folder finds no classes, or one, and scores about 0%. Their classes come from the devkit archive
(read with torchvision's parser, which also checks the archive's md5) or from Kaggle's LOC_val_solution.csv. Each
labelled image goes to DST/<wnid>/ (DST is DIR unless --dst says otherwise): moved, or symlinked or copied (the
flat files then stay where they are). Nothing is ever overwritten: an image whose name is already in its class
folder counts as done, so the tool is safe to run again, after an interruption too (copies are written under a
temporary name and renamed). It reports what it did and the images per class (50 each for ImageNet-1K).
"""

import argparse
import csv
import errno
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from cli import run_tool  # puts the checkout on the path for the imports below
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.imagenet import load_meta_file, parse_devkit_archive

from logger import ProgressLine
from utils import RunError

MODES = ("move", "symlink", "copy")
DEVKIT_NAME = "ILSVRC2012_devkit_t12.tar.gz"
WNID = re.compile(r"n\d{8}")
PARTIAL = ".partial"  # suffix of a copy being written


@dataclass
class Plan:
    """What sorting a folder takes: (source, target) pairs to place, and what is already done or cannot be."""

    to_place: list[tuple[Path, Path]] = field(default_factory=list)
    done: int = 0
    misplaced: list[str] = field(default_factory=list)  # "name in <wnid>/, labelled <wnid>": left alone
    missing: list[str] = field(default_factory=list)  # labelled images found nowhere
    unlabelled: list[str] = field(default_factory=list)  # image files in the flat folder without a label


class Labels(NamedTuple):
    """Each validation image's class: {file name without extension: wnid}, and where that came from."""

    wnids: dict[str, str]
    source: str


def labels_from_devkit(archive: Path) -> Labels:
    """The classes the devkit's ground truth gives ILSVRC2012_val_00000001 ... in order, via torchvision's parser."""
    if not archive.is_file():
        raise RunError(f"--devkit {archive} is not a file; give the path of {DEVKIT_NAME}")
    with tempfile.TemporaryDirectory() as root:
        # torchvision reads the archive under its official name from a root folder, and writes its parse there.
        os.symlink(archive.resolve(), os.path.join(root, DEVKIT_NAME))
        try:
            parse_devkit_archive(root, DEVKIT_NAME)
            _, val_wnids = load_meta_file(root)
        except RuntimeError as err:
            if "corrupted" in str(err):  # torchvision's md5 check
                raise RunError(f"--devkit {archive} is not the official {DEVKIT_NAME} (its md5 differs); download it "
                               "again, or give Kaggle's LOC_val_solution.csv with --labels") from None
            raise RunError(f"--devkit {archive}: {err}") from None
        # The tar, .mat and text readers fail in many ways (TarError, MatReadError, KeyError, ...); nothing but the
        # archive's contents is read in this block, so each is the archive's fault.
        except Exception as err:
            raise RunError(f"cannot read --devkit {archive} ({type(err).__name__}: {err}); is it {DEVKIT_NAME}?"
                           ) from None
    return Labels({f"ILSVRC2012_val_{number:08d}": wnid for number, wnid in enumerate(val_wnids, start=1)},
                  f"{archive} ({len(val_wnids)} labels)")


def labels_from_csv(path: Path) -> Labels:
    """Kaggle's LOC_val_solution.csv: ImageId, PredictionString ("<wnid> x y x y <wnid> ..."; the first wnid)."""
    if not path.is_file():
        raise RunError(f"--labels {path} is not a file; give Kaggle's LOC_val_solution.csv")
    wnids = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise RunError(f"--labels {path}: expected the columns ImageId,PredictionString of LOC_val_solution.csv, "
                           f"found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            tokens = (row["PredictionString"] or "").split()
            if not row["ImageId"] or not tokens or not WNID.fullmatch(tokens[0]):
                raise RunError(f"--labels {path}:{line}: expected an image id and a PredictionString starting with a "
                               f"WordNet id like n01440764, got {row['ImageId']!r}, {row['PredictionString']!r}")
            wnids[row["ImageId"]] = tokens[0]
    if not wnids:
        raise RunError(f"--labels {path} holds no rows")
    return Labels(wnids, f"{path} ({len(wnids)} labels)")


def plan_sort(val: Path, dst: Path, labels: dict[str, str]) -> Plan:
    """Where each labelled image of ``val`` goes under ``dst``; an image already in a class folder is never moved."""
    flat = {path.stem: path for path in val.iterdir()
            if path.is_file() and path.name.lower().endswith(IMG_EXTENSIONS)}
    wnids = set(labels.values())
    placed = {path.stem: path for folder in dst.iterdir() if folder.is_dir() and folder.name in wnids
              for path in folder.iterdir() if not path.name.endswith(PARTIAL)} if dst.is_dir() else {}
    plan = Plan()
    for stem, wnid in sorted(labels.items()):
        if stem in placed:
            if placed[stem].parent.name == wnid:
                plan.done += 1
            else:
                plan.misplaced.append(f"{placed[stem].name} in {placed[stem].parent.name}/, labelled {wnid}")
        elif stem in flat:
            plan.to_place.append((flat[stem], dst / wnid / flat[stem].name))
        else:
            plan.missing.append(stem)
    plan.unlabelled = sorted(path.name for stem, path in flat.items() if stem not in labels)
    return plan


def place(source: Path, target: Path, mode: str) -> None:
    """Move, symlink or copy ``source`` to ``target``, which must not exist; a copy appears only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target):
        raise RunError(f"{target} appeared while sorting; not overwriting it. Run the tool again to continue")
    if mode == "symlink":
        os.symlink(os.path.relpath(source, target.parent), target)
        return
    if mode == "move":
        try:
            os.rename(source, target)
            return
        except OSError as err:
            if err.errno != errno.EXDEV:  # only another file system needs a copy
                raise
    partial = target.with_name(target.name + PARTIAL)
    shutil.copy2(source, partial)
    os.rename(partial, target)
    if mode == "move":
        source.unlink()


def examples(items: Sequence[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")


def run(args: argparse.Namespace) -> int:
    val = args.val
    dst = args.dst or val
    if not val.is_dir():
        raise RunError(f"--val {val} is not a folder; give the folder holding ILSVRC2012_val_*.JPEG")
    labels = labels_from_devkit(args.devkit) if args.devkit else labels_from_csv(args.labels)
    plan = plan_sort(val, dst, labels.wnids)
    if not plan.to_place and not plan.done:
        raise RunError(f"{val} holds none of the {len(labels.wnids)} images that {labels.source} labels "
                       f"(e.g. {next(iter(labels.wnids))}.JPEG); check --val")
    progress = ProgressLine(enabled=True)
    for number, (source, target) in enumerate(plan.to_place, start=1):
        try:
            place(source, target, args.mode)
        except OSError as err:  # permissions, a full disk: what was placed stays, and a new run continues
            raise RunError(f"cannot {args.mode} {source} to {target}: {err.strerror or err}; {number - 1} images "
                           "were placed, fix the cause and run the same command again") from None
        if number % 500 == 0:
            progress.update(f"{args.mode}: {number}/{len(plan.to_place)} images")
    progress.clear()

    print(f"labels: {labels.source}")
    print(f"{args.mode}: {len(plan.to_place)} images placed into {dst}/<wnid>/, {plan.done} already in place")
    if plan.misplaced:
        print(f"warning: {len(plan.misplaced)} images sit in another class folder than their label and were left "
              f"alone: {examples(plan.misplaced)}", file=sys.stderr)
    if plan.missing:
        print(f"warning: {len(plan.missing)} labelled images are in neither {val} nor its class folders: "
              f"{examples(plan.missing)}", file=sys.stderr)
    if plan.unlabelled:
        print(f"warning: {len(plan.unlabelled)} image files in {val} have no label and were left in place: "
              f"{examples(plan.unlabelled)}", file=sys.stderr)
    expected = Counter(labels.wnids.values())
    found = {wnid: sum(1 for path in (dst / wnid).iterdir() if not path.name.endswith(PARTIAL))
             if (dst / wnid).is_dir() else 0 for wnid in expected}
    short = [f"{wnid} {found[wnid]}/{count}" for wnid, count in sorted(expected.items()) if found[wnid] != count]
    sizes = sorted(set(expected.values()))
    print(f"{len(expected)} class folders, {sum(found.values())} images; expected per class: "
          f"{'/'.join(map(str, sizes))} (50 for ImageNet-1K)")
    if short:
        print(f"warning: {len(short)} classes hold another count than labelled: {examples(short)}", file=sys.stderr)
    else:
        print("every class holds the images its labels name")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val", required=True, type=Path, metavar="DIR", help="the flat validation folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--devkit", type=Path, metavar="FILE", help=f"the official {DEVKIT_NAME}")
    source.add_argument("--labels", type=Path, metavar="CSV", help="Kaggle's LOC_val_solution.csv")
    parser.add_argument("--mode", choices=MODES, default="move",
                        help="move the files (default), or symlink or copy them, leaving the flat files in place")
    parser.add_argument("--dst", type=Path, metavar="DIR", help="where the class folders go (default: --val itself)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_tool(main))
