"""Samples that carry their dataset index and the unreadable files passed over to produce them.

One corrupt file among a million must not end a multi-day run, and whether it may is the run's choice
(DATA.BAD_IMAGE), made in the main process. So a dataset never raises for an unreadable image: it yields
the next readable one and names the file it passed over in ``Sample.bad``. That also keeps the DataLoader
from re-raising a worker's exception as a raw traceback.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from .datasets import DataError, UnreadableImageError

# Values of DATA.BAD_IMAGE: "skip" trains past unreadable images (logging each), "error" stops the run.
BAD_IMAGE_POLICIES: tuple[str, ...] = ("skip", "error")


class Sample(NamedTuple):
    """One sample as every dataset of ``build_dataset`` yields it; ``default_collate`` batches each field.

    Attributes:
        image: the transformed image (C, H, W); batched (B, C, H, W).
        target: its class index; batched (B,).
        index: the dataset index that was asked for; batched (B,).
        bad: "" when the image at ``index`` was read. Otherwise one line "PATH: REASON" per unreadable file
            passed over, joined by "\\n", and ``image``/``target`` are those of the next readable image of
            the split (index + 1, + 2, ..., wrapping around). Batched: a sequence of B strings (a tuple).
    """

    image: torch.Tensor
    target: int | torch.Tensor
    index: int | torch.Tensor
    bad: str | Sequence[str]


def max_consecutive_bad(num_samples: int) -> int:
    """Unreadable files in a row after which a split is taken to be broken (a failing disk, a wrong path)."""
    return min(num_samples, max(10, num_samples // 100))


class SampleDataset(Dataset[Sample]):
    """A split that yields :class:`Sample` and passes over unreadable images instead of raising.

    ``base[i]`` returns (transformed image, target) and raises UnreadableImageError when the file of sample
    ``i`` cannot be read or decoded (see ``load_rgb_image``). Only that error is caught, so a failing
    transform still raises. Replacing a bad image by the next readable one keeps batches full.

    Args:
        base: an ImageFolder or CIFAR dataset with its transform.

    Raises:
        DataError: ``max_consecutive_bad(len(base))`` files in a row are unreadable.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.max_bad = max_consecutive_bad(len(base))

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.base):  # the wrap-around below would hide a sampler's bad index
            raise IndexError(f"sample {index} is outside a dataset of {len(self.base)}")
        bad: list[str] = []
        for offset in range(self.max_bad):
            try:
                image, target = self.base[(index + offset) % len(self.base)]
            except UnreadableImageError as err:
                bad.append(str(err))
                continue
            return Sample(image, target, index, "\n".join(bad))
        raise DataError(f"{len(bad)} image files in a row cannot be read, the first {bad[0]}; "
                        "check the disk / DATA.DATA_PATH")
