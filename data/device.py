"""The device side of the input pipeline: uint8 batches to normalised float batches on the device."""

from collections.abc import Iterable, Iterator, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from yacs.config import CfgNode

from .samples import Sample


class DeviceLoader:
    """Iterates a loader of uint8 :class:`Sample` batches and yields them on ``device``, as the model takes them.

    Like timm's PrefetchLoader, for batches of four fields: each batch is copied with ``non_blocking`` (from
    pinned memory the host goes on while it travels), converted to float32 in ``memory_format``, and normalised
    with the operations of torchvision's ToTensor and Normalize, in their order, so that the result is
    bit-identical to the release's host pipeline on the CPU and correctly rounded alike on a GPU. Training
    batches then get timm's RandomErasing with the release's settings, on the device. This is done on a CPU
    device too (in the main process), so there is one code path.

    Random erasing draws from python's ``random`` and the device's torch generator of the main process at the
    moment a batch is fetched (``next``), so re-seeding those before fetching a batch fixes its erasing.
    ``sampler``, ``dataset`` and ``len`` are the wrapped loader's.

    Args:
        loader: a DataLoader (or any iterable) of Samples with uint8 (B, C, H, W) images.
        device: where the batches go.
        erasing: the random erasing of training batches; None for evaluation.
        memory_format: layout of the float images (torch.channels_last for CHANNELS_LAST models).
        mean, std: per-channel normalisation, in [0, 1] units.
    """

    def __init__(
            self,
            loader: Iterable[Sample],
            device: torch.device | str = "cpu",
            erasing: RandomErasing | None = None,
            memory_format: torch.memory_format = torch.contiguous_format,
            mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
            std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.erasing = erasing
        self.memory_format = memory_format
        self.mean = torch.tensor(mean, device=self.device).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(-1, 1, 1)  # (C, 1, 1)

    @property
    def sampler(self) -> object:
        return self.loader.sampler

    @property
    def dataset(self) -> object:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Sample]:
        return (self.prepare(batch) for batch in self.loader)

    def prepare(self, batch: Sample) -> Sample:
        """One batch on the device: float images, normalised (and erased for training), targets alongside."""
        images = batch.image.to(self.device, non_blocking=True)
        images = images.to(torch.float32, memory_format=self.memory_format).div_(255).sub_(self.mean).div_(self.std)
        if self.erasing is not None:
            images = self.erasing(images)
        return batch._replace(image=images, target=batch.target.to(self.device, non_blocking=True))


def build_erasing(config: CfgNode, device: torch.device | str) -> RandomErasing | None:
    """timm's RandomErasing as the release applied it to each training image (AUG.REPROB, REMODE, RECOUNT), or
    None when AUG.REPROB is 0."""
    aug = config.AUG
    if aug.REPROB <= 0:
        return None
    return RandomErasing(aug.REPROB, mode=aug.REMODE, max_count=aug.RECOUNT, device=torch.device(device))
