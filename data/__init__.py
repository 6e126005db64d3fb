"""Data loading: datasets by DATA.DATASET (image folders, packed archives, CIFAR) yielding Samples, the release's
transforms, the device-side normalisation and erasing, mixup, and resumable distributed samplers."""

from .build import ZIP_DATASETS, Loaders, build_dataset, build_loader, build_mixup
from .datasets import DataError
from .demo import make_demo_digits
from .device import DeviceLoader, build_erasing
from .files import ImageFiles, find_images
from .samplers import ShardSampler, TrainSampler
from .samples import Sample, SampleDataset, SampleKey, UnreadableImages
from .transforms import build_transform
from .zipped import ZipImageFolder

__all__ = [
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
