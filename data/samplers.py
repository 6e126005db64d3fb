"""Samplers: training shards that a resumed run can enter mid-epoch, and validation shards that give every
sample to exactly one process."""

from collections.abc import Iterator

from torch.utils.data import DistributedSampler, Sampler


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled by (seed, epoch), padded to equal shards) that can start an epoch
    after the first ``start`` samples of this rank's shard, so a run resumed mid-epoch sees exactly the
    samples the interrupted one had not seen, in the same order."""

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Indices of one process's share of an evaluation set, in dataset order.

    torch's DistributedSampler pads the set (repeating samples) or drops its tail so that every process
    gets the same count; either skews accuracy. Here shards may differ in size by one, no sample is
    repeated or left out, so summing correct counts and sample counts over processes gives exact numbers.

    Args:
        num_samples: size of the dataset.
        rank: this process's index, 0 <= rank < world_size.
        world_size: number of processes.
        contiguous: True gives each process one block of consecutive indices; False takes every
            world_size-th index starting at rank.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, contiguous: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
        if contiguous:
            self.indices = range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)
        else:
            self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
