"""Loose image files named on a command line (files, folders or globs), for the tools that look at a trained model.

Unlike the training splits, nothing here stands in for an unreadable file: a tool reports every file it was
given, so each sample says whether its own file was read.
"""

import glob
import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from .datasets import UnreadableImageError, load_rgb_image
from .samples import Sample


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def find_images(patterns: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The files that ``patterns`` name, each once, in the order given, and the patterns that name none.

    A pattern is a file (taken whatever its extension, so that a mislabelled file is reported, not skipped), a
    folder (searched recursively for files with an image extension, sorted), or a glob (``**`` recurses).

    Returns:
        (files, [(pattern, why nothing was found)]).
    """
    files: dict[str, None] = {}  # insertion-ordered set
    empty: list[tuple[str, str]] = []
    for pattern in patterns:
        if os.path.isfile(pattern):
            found = [pattern]
        elif os.path.isdir(pattern):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(pattern, followlinks=True)
                           for name in names if _is_image_name(name))
            if not found:
                empty.append((pattern, f"folder holds no image files ({', '.join(IMG_EXTENSIONS)})"))
        else:
            found = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
            if not found:
                empty.append((pattern, "no such file or folder, and no file matches it as a glob"))
        files.update(dict.fromkeys(found))
    return list(files), empty


class ImageFiles(Dataset[Sample]):
    """The images of a list of files through ``transform`` (uint8, for a ``DeviceLoader``), as
    :class:`~data.samples.Sample` with target -1.

    A file that cannot be read or decoded gives a zero image of ``shape`` and its reason in ``bad``, so that
    batches keep their size and the caller can report it beside the others.
    """

    def __init__(self, paths: Sequence[str], transform: Callable, shape: tuple[int, int, int]) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        path = self.paths[index]
        try:
            return Sample(self.transform(load_rgb_image(path)), -1, index, "")
        except UnreadableImageError as err:
            return Sample(torch.zeros(self.shape, dtype=torch.uint8), -1, index, str(err).removeprefix(f"{path}: "))
