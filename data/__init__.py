"""Data loading: datasets by DATA.DATASET yielding Samples, release transforms, mixup, and distributed samplers."""

from .build import Loaders, build_dataset, build_loader, build_mixup
from .datasets import DataError
from .demo import make_demo_digits
from .samplers import ShardSampler
from .samples import BAD_IMAGE_POLICIES, Sample, SampleDataset
from .transforms import build_transform

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DataError",
    "Loaders",
    "Sample",
    "SampleDataset",
    "ShardSampler",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "make_demo_digits",
]
