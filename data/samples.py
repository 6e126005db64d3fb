"""Samples that carry their dataset index and the unreadable files passed over to produce them, augmented with
randomness that depends only on (seed, epoch, index, repeat).

One corrupt file among a million must not end a multi-day run, and whether it may is the run's choice
(DATA.BAD_IMAGE), made in the main process. So a dataset never raises for an unreadable image: it yields
the next readable one and names the file it passed over in ``Sample.bad``. That also keeps the DataLoader
from re-raising a worker's exception as a raw traceback.

Every random draw of a sample's transform (timm's and torchvision's transforms draw from python's ``random``,
numpy and torch) is seeded from (seed, epoch, index, repeat) just before the transform runs (the repeat number
tells apart the copies of an image that repeated augmentation trains on in one epoch). A sample is then the same
whichever loader worker (or the main process) loads it, so a run gives the same weights with 0, 1 or 4 workers
and a run resumed in the middle of an epoch sees exactly the augmentations of an uninterrupted one.
"""

import contextlib
import logging
import operator
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .datasets import DataError, UnreadableImageError


class SampleKey(NamedTuple):
    """What a training sampler asks a SampleDataset for: a dataset index in an epoch, and which copy of it.

    The epoch travels with each index, from the sampler in the main process, so that the dataset copies held by
    loader workers (persistent ones included) never need to be told which epoch it is. ``repeat`` numbers the
    copies of an image in one epoch under repeated augmentation (DATA.AUG_REPEATS), each augmented its own way.
    """

    epoch: int
    index: int
    repeat: int = 0


class Sample(NamedTuple):
    """One sample as every dataset of ``build_dataset`` yields it; ``default_collate`` batches each field.

    Attributes:
        image: the transformed image, uint8 (C, H, W); batched (B, C, H, W). ``data.DeviceLoader`` turns batches
            into normalised floats on the device.
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


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """The 64-bit seed of one sample's augmentation in one epoch; SeedSequence mixes the numbers so that
    neighbouring indices, epochs and copies get unrelated streams. A first copy (``repeat`` 0) keeps the seed of a
    run without repeated augmentation."""
    entropy = [seed, epoch, index, repeat] if repeat else [seed, epoch, index]
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed python's ``random``, numpy's global RNG and torch's CPU generator for the block.

    In the main process (a loader without workers, or a direct ``dataset[i]``) their states are restored
    afterwards, so that loading a sample does not move the random stream of training (mixup, drop path).
    Worker processes draw from their RNGs for nothing else, so they skip the restore (about 0.1 ms a sample).
    CUDA generators are never touched.
    """
    restore = get_worker_info() is None
    if restore:
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class SampleDataset(Dataset[Sample]):
    """A split that yields :class:`Sample`, augments as a pure function of (seed, epoch, index, repeat), and passes
    over unreadable images instead of raising.

    ``base[i]`` returns (transformed image, target) and raises UnreadableImageError when the file of sample
    ``i`` cannot be read or decoded (see ``open_image`` and ``decode_rgb``). Only that error is caught, so a
    failing transform still raises. Replacing a bad image by the next readable one keeps batches full.

    Args:
        base: an ImageFolder, ZipImageFolder or CIFAR dataset with its transform.
        seed: the run's seed (config.SEED); with the epoch, the index and the repeat number it seeds each sample's
            transform.

    Raises:
        DataError: ``max_consecutive_bad(len(base))`` files in a row are unreadable.
    """

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base = base
        self.seed = seed
        self.max_bad = max_consecutive_bad(len(base))

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | SampleKey) -> Sample:
        """The sample of a dataset index (validation; epoch 0) or of a :class:`SampleKey` (training)."""
        epoch, index, repeat = SampleKey(*key) if isinstance(key, tuple) else SampleKey(0, operator.index(key))
        if not 0 <= index < len(self.base):  # the wrap-around below would hide a sampler's bad index
            raise IndexError(f"sample {index} is outside a dataset of {len(self.base)}")
        seed = sample_seed(self.seed, epoch, index, repeat)
        bad: list[str] = []
        for offset in range(self.max_bad):
            try:
                # Re-seeded for each file tried: a replacement's augmentation does not depend on how far the
                # transform got with the unreadable file before it failed.
                with seeded_rngs(seed):
                    image, target = self.base[(index + offset) % len(self.base)]
            except UnreadableImageError as err:
                bad.append(str(err))
                continue
            return Sample(image, target, index, "\n".join(bad))
        raise DataError(f"{len(bad)} image files in a row cannot be read, the first {bad[0]}; "
                        "check the disk / DATA.DATA_PATH")


class UnreadableImages:
    """What DATA.BAD_IMAGE lets a run do with the unreadable image files it meets (see ``Sample.bad``).

    Each file is logged once, with its reason. The run stops when DATA.BAD_IMAGE is "error", or when more
    than 1% of the images of an epoch (or of the validation set) cannot be read: a broken disk is not noise.
    Its checks take counts summed over ranks, so every rank stops at the same step.
    """

    MAX_FRACTION = 0.01

    def __init__(self, policy: str = "skip") -> None:
        self.policy = policy
        self.logged: set[str] = set()

    def note(self, bad: Sequence[str], logger: logging.Logger) -> list[str]:
        """The first line ("PATH: REASON" of the sample's own file) of each replaced sample of a batch; every
        file passed over that was not logged before is logged now."""
        for line in (line for text in bad for line in text.splitlines()):
            if line not in self.logged:
                self.logged.add(line)
                logger.warning(f"unreadable image passed over (DATA.BAD_IMAGE {self.policy}): {line}")
        return [text.splitlines()[0] for text in bad if text]

    def check(self, own: list[str], count: int, where: str) -> None:
        """Under DATA.BAD_IMAGE error, stop every rank when any met an unreadable image.

        Args:
            own: this rank's unreadable files since the last check.
            count: their number summed over ranks.
        """
        if self.policy == "error" and count:
            if own:
                raise DataError(f"cannot read image {own[0]} at {where}; remove or replace the file, or set "
                                "DATA.BAD_IMAGE skip to continue past unreadable images")
            raise DataError(f"{count} image(s) cannot be read at {where} (DATA.BAD_IMAGE error); the rank that "
                            "read them names each file")

    def check_fraction(self, seen: int, total: int, scope: str) -> None:
        """Stop every rank when ``seen`` of the ``total`` images of ``scope`` (sums over ranks) exceed the limit."""
        if seen > self.MAX_FRACTION * total:
            raise DataError(f"{seen} of the {total} images of {scope} cannot be read, more than "
                            f"{self.MAX_FRACTION:.0%}: check the disk and DATA.DATA_PATH (a broken disk is not noise)")
