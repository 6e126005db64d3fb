"""Data loading: datasets by DATA.DATASET (image folders, packed archives, CIFAR, ImageNet's robustness test sets)
yielding Samples, the release's transforms, the device-side normalisation and erasing, mixup, resumable distributed
samplers, and how each test set is scored."""

from .build import ZIP_DATASETS, Loaders, build_dataset, build_loader, build_mixup
from .datasets import DataError
from .demo import make_demo_digits
from .device import DeviceLoader, build_erasing
from .files import ImageFiles, find_images
from .robustness import Scoring, build_scoring, check_trainable, model_classes
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
    "Scoring",
    "ShardSampler",
    "TrainSampler",
    "UnreadableImages",
    "ZipImageFolder",
    "build_dataset",
    "build_erasing",
    "build_loader",
    "build_mixup",
    "build_scoring",
    "build_transform",
    "check_trainable",
    "find_images",
    "make_demo_digits",
    "model_classes",
]
