"""Data loading: datasets by DATA.DATASET yielding Samples, release transforms, mixup, and distributed samplers."""

from .build import DATASETS, MIXUP_MODES, Loaders, build_dataset, build_loader, build_mixup
from .datasets import DataError
from .demo import make_demo_digits
from .files import ImageFiles, find_images
from .samplers import ShardSampler
from .samples import BAD_IMAGE_POLICIES, Sample, SampleDataset
from .transforms import INTERPOLATIONS, RANDOM_ERASING_MODES, build_transform

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DATASETS",
    "INTERPOLATIONS",
    "MIXUP_MODES",
    "RANDOM_ERASING_MODES",
    "DataError",
    "ImageFiles",
    "Loaders",
    "Sample",
    "SampleDataset",
    "ShardSampler",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "find_images",
    "make_demo_digits",
]
