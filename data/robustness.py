"""ImageNet-1k's robustness test sets (ImageNet-V2, -A, -R, -Sketch and ReaL), read for evaluation only, and how
each is scored.

The numbers papers report beside ImageNet top-1 are easy to get wrong: ImageNet-A and -R must be scored over the
logits of their own 200 classes, not over all 1000 outputs; ImageNet-V2's folders are class indices, which sorted
as text put folder 10 third; ReaL scores the validation images against sets of labels, and leaves out those with
none. Each folder's label therefore comes from its name, never from its place in a listing, and the class lists
and label maps are the ones timm ships in ``timm/data/_info`` (read from the installed timm, never copied).
"""

import functools
import json
import os
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torchvision.datasets import ImageFolder

from .datasets import DataError, read_image
from .samples import SampleDataset

# What each test set expects at DATA.DATA_PATH, quoted in errors.
ROBUSTNESS_LAYOUTS: dict[str, str] = {
    "imagenet_v2": "ImageNetV2's class folders 0..999 named by class index (imagenetv2-matched-frequency-format-val/)",
    "imagenet_a": "ImageNet-A's 200 class folders named by WordNet id (imagenet-a/n01498041/...)",
    "imagenet_r": "ImageNet-R's 200 class folders named by WordNet id (imagenet-r/n01443537/...)",
    "imagenet_sketch": "ImageNet-Sketch's 1000 class folders named by WordNet id (sketch/n01440764/...)",
    "imagenet_real": "ImageNet's val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG, as DATA.DATASET imagenet reads them "
                     "(tools/prepare_imagenet.py sorts the official flat folder)",
}
ROBUSTNESS_SETS = tuple(ROBUSTNESS_LAYOUTS)
SUBSET_SETS = ("imagenet_a", "imagenet_r")  # scored over their 200 classes' logits
IMAGENET_CLASSES = 1000  # the outputs of the classifiers these sets test
REAL_FILE_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")  # the names ReaL's labels are keyed by


@functools.cache
def _timm_info(name: str) -> str:
    """A file of timm's dataset information (``timm/data/_info``), as timm itself reads it."""
    return pkgutil.get_data("timm.data", f"_info/{name}").decode("utf-8")


def imagenet_wnids() -> list[str]:
    """ImageNet-1k's 1000 WordNet ids in class-index order (sorted, as ImageNet's class folders sort)."""
    return _timm_info("imagenet_synsets.txt").split()


def subset_columns(kind: str) -> list[int]:
    """The ImageNet-1k class indices of ImageNet-A's or -R's 200 classes, ascending (timm's order)."""
    return [int(index) for index in _timm_info(f"{kind}_indices.txt").split()]


def real_label_sets() -> list[list[int]]:
    """ReaL's labels of the 50,000 validation images, in file-number order; an empty list: no label."""
    return json.loads(_timm_info("imagenet_real_labels.json"))


def _class_folders(kind: str) -> tuple[list[str], list[str]]:
    """(the folder name of each scored class, the scored classes' names), both in scored-class order."""
    wnids = imagenet_wnids()
    if kind == "imagenet_v2":
        return [str(index) for index in range(IMAGENET_CLASSES)], wnids
    if kind in SUBSET_SETS:
        subset = [wnids[index] for index in subset_columns(kind)]
        return subset, subset
    return wnids, wnids


class RobustnessFolder(ImageFolder):
    """A test set's images, read as ImageFolder splits are (undecoded, see ``read_image``), each labelled by the
    name of its folder.

    Attributes:
        kind: the DATA.DATASET it is.
        classes: the scored classes' names, the rows of the reports: ImageNet-A's or -R's 200 WordNet ids,
            ImageNet-1k's 1000 otherwise (ImageNet-V2's folders named by index included).
        samples: (path, scored-class index) in class order, then file order.
        found: how many of the set's class folders are present (a partial download keeps its labels).
        label_sets: ReaL's labels of each sample (imagenet_real), else None.
    """

    def __init__(self, root: str, kind: str, transform: Callable | None) -> None:
        self.kind = kind
        self.folder_names, scored = _class_folders(kind)
        super().__init__(root, transform=transform, loader=read_image)  # calls find_classes
        self.found = len(self.classes)
        self.classes = scored
        self.class_to_idx = {name: index for index, name in enumerate(scored)}
        # ImageFolder lists folders as text sorts them ("10" before "2"); stable, so files keep their order.
        self.samples.sort(key=lambda sample: sample[1])
        self.imgs = self.samples
        self.targets = [target for _, target in self.samples]
        self.label_sets = self._real_labels() if kind == "imagenet_real" else None

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The class folders present and the scored-class index each name stands for."""
        labels = {name: index for index, name in enumerate(self.folder_names)}
        folders = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        unknown = [name for name in folders if name not in labels]
        if unknown or not folders:
            found = f"folders that name none of its classes ({', '.join(unknown[:3])})" if unknown else \
                "no class folders"
            raise DataError(f"{self.kind}: {directory} holds {found}; expected {ROBUSTNESS_LAYOUTS[self.kind]}")
        return folders, {name: labels[name] for name in folders}

    def _real_labels(self) -> list[list[int]]:
        """ReaL's labels of each sample, found by its file name."""
        table = real_label_sets()
        label_sets = []
        for path, _ in self.samples:
            match = REAL_FILE_NAME.fullmatch(os.path.basename(path))
            if match is None or not 1 <= int(match[1]) <= len(table):
                raise DataError(f"imagenet_real: {path} is not one of ImageNet's validation images "
                                f"(ILSVRC2012_val_00000001.JPEG .. ILSVRC2012_val_{len(table):08d}.JPEG), by which "
                                "ReaL's labels are found; give ImageNet's validation folder under its own names")
            label_sets.append(table[int(match[1]) - 1])
        return label_sets

    def describe(self) -> str:
        """A line for the log: what was found and how it is scored."""
        over = (f"the logits of its {len(self.classes)} classes" if self.kind in SUBSET_SETS else
                f"all {IMAGENET_CLASSES} outputs")
        line = (f"{self.kind}: {len(self.samples):,} images in {self.found} of its {len(self.folder_names)} class "
                f"folders, scored over {over}")
        if self.label_sets is not None:
            unlabelled = sum(not labels for labels in self.label_sets)
            line += (f" against ReaL's labels (top-1 right when among an image's labels; {unlabelled:,} images "
                     "without a label are left out)")
        return line


def robustness_split(root: str, kind: str, is_train: bool, transform: Callable | None) -> RobustnessFolder:
    """The test set ``kind`` at ``root`` (ReaL: the validation images at ``root/val``)."""
    if is_train:
        check_trainable(kind)
    path = os.path.join(root, "val") if kind == "imagenet_real" else root
    if not os.path.isdir(path):
        raise DataError(f"{kind}: {path} is not a folder; set DATA.DATA_PATH (--data-path) to "
                        f"{ROBUSTNESS_LAYOUTS[kind]}")
    try:
        return RobustnessFolder(path, kind, transform)
    except FileNotFoundError as err:  # a class folder without images
        raise DataError(f"{kind}: {path}: {str(err).rstrip('.')}; expected {ROBUSTNESS_LAYOUTS[kind]}") from None


def check_trainable(kind: str) -> None:
    """Refuse to train on a test set."""
    if kind in ROBUSTNESS_SETS:
        raise DataError(f"DATA.DATASET {kind} is a test set without training images; evaluate on it with --eval "
                        "(and --resume or --pretrained), or train on imagenet")


def check_model_outputs(kind: str, num_classes: int) -> None:
    """A test set scores the outputs of an ImageNet-1k classifier."""
    if num_classes != IMAGENET_CLASSES:
        raise DataError(f"DATA.DATASET {kind} tests ImageNet-1k classifiers, but MODEL.NUM_CLASSES is {num_classes}; "
                        f"evaluate a model with {IMAGENET_CLASSES} outputs (trained on imagenet)")


def model_classes(dataset: SampleDataset) -> list[str]:
    """The class names the evaluated model's outputs must have: ImageNet-1k's for a test set (whose own classes may
    be a subset), else the dataset's."""
    return imagenet_wnids() if isinstance(dataset.base, RobustnessFolder) else list(dataset.classes)


class ScoredBatch(NamedTuple):
    """A batch as evaluation counts it: only its images that have a label, logits of the scored classes only.

    Attributes:
        logits: (B', K) the scored classes' logits.
        targets: (B',) each image's class among the K (ReaL: its folder's class, for the loss and the reports).
        indices: (B',) dataset indices.
        correct: (B', k) whether each of the k = min(5, K) best classes is right (top-1 right: ``correct[:, 0]``,
            top-5 right: ``correct.any(dim=1)``).
        unlabelled: how many images were left out for having no label (ReaL), a 0-d tensor.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    correct: torch.Tensor
    unlabelled: torch.Tensor


@dataclass(frozen=True)
class Scoring:
    """Which of the model's outputs a dataset scores and which labels count as right; the default scores every
    output against each image's target.

    Attributes:
        columns: (K,) the model outputs scored, in the order of the dataset's classes (ImageNet-A/-R: their 200 of
            ImageNet-1k's 1000); None scores every output.
        label_sets: (N, L) for each dataset index, the labels any of which is right (ReaL's), padded with -1; a row
            without a label is left out. None: the target alone is right.
        description: a line for the log ("" for datasets scored the ordinary way).
    """

    columns: torch.Tensor | None = None
    label_sets: torch.Tensor | None = None
    description: str = ""

    def score(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> ScoredBatch:
        """Score a batch: logits (B, C) of the model's outputs, targets (B,), dataset indices (B,)."""
        if self.columns is not None:
            logits = logits[:, self.columns]  # (B, K)
        labels = targets[:, None] if self.label_sets is None else self.label_sets[indices]  # (B, L)
        labelled = labels[:, 0] >= 0  # (B,)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        correct = (top[:, :, None] == labels[:, None, :]).any(dim=2)  # (B, k)
        return ScoredBatch(logits[labelled], targets[labelled], indices[labelled], correct[labelled],
                           (~labelled).sum())


def build_scoring(dataset: SampleDataset, device: torch.device | str) -> Scoring:
    """How evaluation scores ``dataset`` (a test set's rule, or the ordinary one), its tensors on ``device``."""
    base = dataset.base
    if not isinstance(base, RobustnessFolder):
        return Scoring()
    columns = torch.tensor(subset_columns(base.kind), device=device) if base.kind in SUBSET_SETS else None
    label_sets = None
    if base.label_sets is not None:
        label_sets = torch.full((len(base.label_sets), max([1, *map(len, base.label_sets)])), -1)  # (N, L)
        for row, labels in enumerate(base.label_sets):
            label_sets[row, :len(labels)] = torch.tensor(labels)
        label_sets = label_sets.to(device)
    return Scoring(columns, label_sets, base.describe())
