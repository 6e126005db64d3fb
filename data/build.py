"""Datasets, samplers and loaders for training and validation, chosen by DATA.DATASET."""

from collections.abc import Callable
from typing import NamedTuple

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from .datasets import CIFAR_KINDS, FOLDER_LAYOUTS, DataError, cifar_split, image_folder_split
from .demo import make_demo_digits
from .device import DeviceLoader, build_erasing
from .robustness import ROBUSTNESS_SETS, check_model_outputs, robustness_split
from .samplers import ShardSampler, TrainSampler
from .samples import SampleDataset
from .transforms import build_transform
from .zipped import ZipImageFolder, zip_split

ZIP_DATASETS = tuple(kind for kind in FOLDER_LAYOUTS if kind != "demo")  # the demo writes its own folders


class Loaders(NamedTuple):
    """What build_loader returns; unpacks like the release's five-tuple. The training fields are None when
    only validation was built (``build_loader(..., train=False)``)."""

    dataset_train: SampleDataset | None
    dataset_val: SampleDataset
    loader_train: DeviceLoader | None
    loader_val: DeviceLoader
    mixup_fn: Mixup | None


def build_dataset(is_train: bool, config: CfgNode) -> SampleDataset:
    """The training or validation split of DATA.DATASET under DATA.DATA_PATH, with its transform.

    Image-folder kinds are read from folders, or with DATA.ZIP_MODE from Swin's packed archives; the robustness
    test sets (see data/robustness.py) have only the evaluation split. It yields
    :class:`~data.samples.Sample` of uint8 images, augmented as a function of (SEED, epoch, index), and passes
    over unreadable images (see SampleDataset).
    """
    kind = config.DATA.DATASET
    root = config.DATA.DATA_PATH
    split = "train" if is_train else "val"
    transform = build_transform(is_train, config)
    if config.DATA.ZIP_MODE:
        if kind not in ZIP_DATASETS:
            raise DataError(f"DATA.ZIP_MODE reads packed image folders ({', '.join(ZIP_DATASETS)}), not {kind}; "
                            "set DATA.ZIP_MODE False")
        base = zip_split(root, split, kind, transform, config.DATA.ZIP_MAX_MEMBER_MB * 2**20)
    elif kind in CIFAR_KINDS:
        base = cifar_split(root, is_train, kind, transform)
    elif kind in ROBUSTNESS_SETS:
        base = robustness_split(root, kind, is_train, transform)
    else:
        base = image_folder_split(root, split, kind, transform)
    return SampleDataset(base, seed=config.SEED)


def _check_classes(train: SampleDataset | None, val: SampleDataset, config: CfgNode) -> None:
    """Validation must have as many classes as the classifier has outputs, and training (if built) the same."""
    if train is not None and list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"{config.DATA.DATA_PATH}: train and val have different classes "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]}); both splits need the same class folders"
        )
    if len(val.classes) != config.MODEL.NUM_CLASSES:
        raise DataError(
            f"{config.DATA.DATA_PATH} holds {len(val.classes)} classes but MODEL.NUM_CLASSES is "
            f"{config.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES {len(val.classes)} (--opts) or fix the data"
        )


def build_mixup(config: CfgNode) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing, or None when AUG turns both off."""
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0 and aug.CUTMIX_MINMAX is None:
        return None
    return Mixup(
        mixup_alpha=aug.MIXUP,
        cutmix_alpha=aug.CUTMIX,
        cutmix_minmax=aug.CUTMIX_MINMAX,
        prob=aug.MIXUP_PROB,
        switch_prob=aug.MIXUP_SWITCH_PROB,
        mode=aug.MIXUP_MODE,
        label_smoothing=config.MODEL.LABEL_SMOOTHING,
        num_classes=config.MODEL.NUM_CLASSES,
    )


def _cache_members(dataset: SampleDataset, mode: str, shard: range | ShardSampler) -> None:
    """Apply DATA.CACHE_MODE to a packed split: "full" holds every member, "part" those of ``shard``."""
    if isinstance(dataset.base, ZipImageFolder) and mode != "no":
        dataset.base.cache(range(len(dataset)) if mode == "full" else shard)


def build_loader(config: CfgNode, rank: int = 0, world_size: int = 1, train: bool = True,
                 device: torch.device | str = "cpu", worker_init_fn: Callable[[int], None] | None = None) -> Loaders:
    """Datasets, loaders and the mixup function for process ``rank`` of ``world_size``.

    The loaders yield batches on ``device`` (see DeviceLoader): images float32, normalised, and for training
    randomly erased; loader workers produce uint8 images. Training shuffles through a TrainSampler: call
    ``loader_train.sampler.set_epoch(epoch)`` each epoch, ``set_epoch(epoch, start=k)`` to resume after the
    first k samples of this process's share; it drops the last incomplete batch. Validation gives every sample
    to exactly one process (see ShardSampler), so that sums of correct predictions over processes are exact.
    ``train=False`` (evaluation, throughput) reads only the validation split, never the training one, and
    returns None for the training dataset, loader and mixup function. Each loader worker runs ``worker_init_fn``
    (given its id) as it starts; main.py passes distributed.ignore_preemption_signals, so that the stop signals a
    cluster sends every process reach the main process alone, which handles them.
    Batches are :class:`~data.samples.Sample` of tensors (``bad`` a tuple of strings).
    The "demo" dataset is written to DATA.DATA_PATH first if it is not there yet.
    """
    if config.DATA.DATASET == "demo":
        make_demo_digits(config.DATA.DATA_PATH)
    dataset_train = build_dataset(True, config) if train else None
    dataset_val = build_dataset(False, config)
    if config.DATA.DATASET in ROBUSTNESS_SETS:  # scored by an ImageNet-1k classifier, on its own classes
        check_model_outputs(config.DATA.DATASET, config.MODEL.NUM_CLASSES)
    else:
        _check_classes(dataset_train, dataset_val, config)

    workers = config.DATA.NUM_WORKERS
    common = {
        "batch_size": config.DATA.BATCH_SIZE,
        "num_workers": workers,
        # Pinning only helps copies to a GPU (and warns without one).
        "pin_memory": config.DATA.PIN_MEMORY and torch.device(device).type == "cuda",
        "persistent_workers": config.DATA.PERSISTENT_WORKERS and workers > 0,
        "worker_init_fn": worker_init_fn,
    }
    memory_format = torch.channels_last if config.CHANNELS_LAST else torch.contiguous_format
    sampler_val = ShardSampler(len(dataset_val), rank, world_size)
    _cache_members(dataset_val, config.DATA.CACHE_MODE, sampler_val)
    loader_val = DeviceLoader(DataLoader(dataset_val, sampler=sampler_val, drop_last=False, **common), device,
                              memory_format=memory_format)
    if dataset_train is None:
        return Loaders(None, dataset_val, None, loader_val, None)

    fixed_shards = config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "part"  # each process reads what it caches
    if fixed_shards and len(dataset_train) < world_size:
        raise DataError(f"{config.DATA.DATA_PATH} has {len(dataset_train)} training images, fewer than the "
                        f"{world_size} processes that DATA.CACHE_MODE part gives a shard each; use fewer processes")
    sampler_train = TrainSampler(len(dataset_train), rank, world_size, seed=config.SEED, fixed_shards=fixed_shards,
                                 repeats=config.DATA.AUG_REPEATS)
    if len(sampler_train) < config.DATA.BATCH_SIZE:
        raise DataError(
            f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is more than the {len(sampler_train)} training images each of "
            f"the {world_size} processes gets from {config.DATA.DATA_PATH}; lower it with --batch-size"
        )
    _cache_members(dataset_train, config.DATA.CACHE_MODE, range(rank, len(dataset_train), world_size))
    loader_train = DeviceLoader(DataLoader(dataset_train, sampler=sampler_train, drop_last=True, **common), device,
                                erasing=build_erasing(config, device), memory_format=memory_format)
    return Loaders(dataset_train, dataset_val, loader_train, loader_val, build_mixup(config))
