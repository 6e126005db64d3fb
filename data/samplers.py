"""Samplers: shuffled training shares that can start in the middle of an epoch, and validation sharding that
gives every sample to exactly one process."""

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .samples import SampleKey


class TrainSampler(Sampler[SampleKey]):
    """This process's share of an epoch's shuffled order, from any position in it.

    The order is torch's DistributedSampler's: a permutation drawn with ``seed + epoch``, padded by repeating its
    head to a multiple of ``world_size``, of which process ``rank`` takes every ``world_size``-th index starting
    at ``rank``. ``set_epoch(epoch, start=k)`` skips the first ``k`` samples of this process's share, so a run
    resumed after ``k`` samples continues with exactly those it had not seen, none repeated or skipped. Each
    index is yielded as a :class:`SampleKey` carrying the epoch, which seeds the sample's augmentation.

    With ``repeats`` R > 1, DeiT's repeated augmentation (its RASampler): each index of the permutation stands R
    times in a row before the padding and the striding, so the R copies of an image go to R different processes
    when there are at least R; each copy carries its number (``SampleKey.repeat``), which gives it augmentations
    of its own. A process keeps DeiT's epoch length, the first ``floor(N / 256) * 256 / world_size`` entries of
    its share (``ceil(N / world_size)`` when the set holds under 256 images): an epoch is about as long as one
    without repeats and sees about N / R distinct images. Where a process holds several copies of one image (fewer
    processes than repeats), it takes every image's first copy before any second copy, and so on: copies in one
    batch would share its BatchNorm statistics.

    Args:
        num_samples: size of the dataset.
        rank: this process's index, 0 <= rank < world_size.
        world_size: number of processes.
        seed: the run's seed (config.SEED).
        fixed_shards: give each process the same indices every epoch (those with index % world_size == rank),
            shuffled among themselves with ``seed + epoch`` and padded to equal counts: what a process caches
            in memory under DATA.CACHE_MODE "part" is then all it reads (as Swin-Transformer does).
        repeats: copies of each image per epoch (DATA.AUG_REPEATS); more than 1 needs shared (not fixed) shards.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int = 0, fixed_shards: bool = False,
                 repeats: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
        if num_samples < (world_size if fixed_shards else 1):
            raise ValueError(f"{num_samples} samples cannot give each of {world_size} processes a training share")
        if repeats < 1 or (fixed_shards and repeats > 1):
            raise ValueError(f"repeats must be 1 or more, and 1 with fixed shards (an image's copies go to other "
                             f"processes); got {repeats}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.fixed_shards = fixed_shards
        self.repeats = repeats
        self.per_rank = math.ceil(num_samples / world_size)  # every process takes as many, padding included
        if repeats > 1 and num_samples >= 256:  # DeiT's length: the whole set rounded down to 256, once over
            self.per_rank = num_samples // 256 * 256 // world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw the order of ``epoch`` and begin after the first ``start`` samples of this process's share."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} is outside this process's share of {self.per_rank} samples per epoch")
        self.epoch = epoch
        self.start = start

    def order(self) -> list[SampleKey]:
        """This process's samples of the current epoch, in order, from its first sample."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        if self.fixed_shards:
            shard = range(self.rank, self.num_samples, self.world_size)
            indices = [shard[i] for i in torch.randperm(len(shard), generator=generator).tolist()]
            return [SampleKey(self.epoch, index) for index in _pad(indices, self.per_rank)]
        permutation = torch.randperm(self.num_samples, generator=generator).tolist()
        copies = [(index, repeat) for index in permutation for repeat in range(self.repeats)]
        shared = _pad(copies, math.ceil(len(copies) / self.world_size) * self.world_size)
        own = shared[self.rank::self.world_size][:self.per_rank]
        # Of one image's copies, a process holds numbers c, c + world_size, ...: the k-th waits for its k-th round.
        own.sort(key=lambda copy: copy[1] // self.world_size)
        return [SampleKey(self.epoch, index, repeat) for index, repeat in own]

    def __iter__(self) -> Iterator[SampleKey]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        """Samples still to come in this epoch: the share less ``start``."""
        return self.per_rank - self.start


def _pad(indices: list, length: int) -> list:
    """``indices`` repeated from its head up to ``length`` items (DistributedSampler's padding)."""
    return (indices * math.ceil(length / len(indices)))[:length]


class ShardSampler(Sampler[int]):
    """Indices of one process's share of an evaluation set, in dataset order.

    torch's DistributedSampler pads the set (repeating samples) or drops its tail so that every process
    gets the same count; either skews accuracy. Here shards may differ in size by one, no sample is
    repeated or left out, so summing correct counts and sample counts over processes gives exact numbers.

    Args:
        num_samples: size of the dataset.
        rank: this process's index, 0 <= rank < world_size.
        world_size: number of processes; process ``rank`` takes every ``world_size``-th index from ``rank`` on.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
