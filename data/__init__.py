"""Data loading: datasets by DATA.DATASET (image folders, packed archives, CIFAR) yielding Samples, the release's
transforms, the device-side normalisation and erasing, mixup, and resumable distributed samplers."""

from .build import DATASETS, MIXUP_MODES, ZIP_DATASETS, Loaders, build_dataset, build_loader, build_mixup
from .datasets import DataError
from .demo import make_demo_digits
from .device import DeviceLoader, build_erasing
from .files import ImageFiles, find_images
from .samplers import ShardSampler, TrainSampler
from .samples import BAD_IMAGE_POLICIES, Sample, SampleDataset, SampleKey, UnreadableImages
from .transforms import INTERPOLATIONS, RANDOM_ERASING_MODES, build_transform
from .zipped import CACHE_MODES, ZipImageFolder

__all__ = [
    "BAD_IMAGE_POLICIES",
    "CACHE_MODES",
    "DATASETS",
    "INTERPOLATIONS",
    "MIXUP_MODES",
    "RANDOM_ERASING_MODES",
    "ZIP_DATASETS",
    "DataError",
    "DeviceLoader",
    "ImageFiles",
    "Loaders",
    "Sample",
    "SampleDataset",
    "SampleKey",
    "ShardSampler",
    "TrainSampler",
    "UnreadableImages",
    "ZipImageFolder",
    "build_dataset",
    "build_erasing",
    "build_loader",
    "build_mixup",
    "build_transform",
    "find_images",
    "make_demo_digits",
]
