"""The input pipeline: augmentation as a function of (seed, epoch, index) whatever the worker count, and the
resumable training sampler."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import load_weights, run_dir, write_config, write_image_folder
from torch.utils.data import DataLoader, DistributedSampler

import main
from config import load_config
from data import Sample, SampleKey, TrainSampler, build_loader
from data.samples import sample_seed

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO / "configs" / "demo" / "strip_mlp_demo.yaml")
# The release's random augmentations, all on.
RELEASE_AUG = ["AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.HFLIP", "0.5", "AUG.REPROB", "0.25",
               "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"]


def _config(path: Path, *opts: str) -> object:
    return load_config(DEMO_CFG, ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(path), "MODEL.NUM_CLASSES", "3",
                                  "DATA.BATCH_SIZE", "4", *RELEASE_AUG, *opts])


def _epoch_batches(loader: DataLoader, epoch: int, start: int = 0) -> list[Sample]:
    """The batches of an epoch from ``start``, the main process's RNGs re-seeded before each batch is fetched, as a
    training loop that re-seeds per step does."""
    loader.sampler.set_epoch(epoch, start=start)
    first_step = start // loader.batch_size
    batches, iterator = [], iter(loader)
    for step in range(first_step, first_step + len(loader)):
        random.seed(1000 * epoch + step)
        torch.manual_seed(1000 * epoch + step)
        batches.append(next(iterator))
    return batches


def _assert_same(a: list[Sample], b: list[Sample]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.image, y.image) and torch.equal(x.target, y.target) and torch.equal(x.index, y.index)


@pytest.mark.parametrize("img_size", [32, 64])  # 32: the release's pad-and-crop; 64: the random resized crop
def test_batches_are_the_same_with_0_1_and_4_loader_workers(tmp_path: Path, img_size: int) -> None:
    root = write_image_folder(tmp_path / "images", classes=3, train_per_class=6, val_per_class=2, size=48)
    runs = {}
    for workers in (0, 1, 4):
        loaders = build_loader(_config(root, "DATA.IMG_SIZE", str(img_size), "DATA.NUM_WORKERS", str(workers)))
        runs[workers] = [_epoch_batches(loaders.loader_train, epoch) for epoch in (0, 1)]
    for workers in (1, 4):
        for epoch in (0, 1):
            _assert_same(runs[0][epoch], runs[workers][epoch])
    assert not torch.equal(runs[0][0][0].image, runs[0][1][0].image)  # a new epoch augments anew


def test_a_sample_is_a_pure_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", classes=3, train_per_class=2, val_per_class=1, size=48)
    dataset = build_loader(_config(root, "DATA.IMG_SIZE", "64", "DATA.NUM_WORKERS", "0")).dataset_train
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = dataset[SampleKey(3, 2)]
    dataset[SampleKey(3, 4)]
    # Loaded in the main process, samples leave its random streams (mixup, drop path) where they were.
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    torch.manual_seed(123)
    random.seed(5)
    again = dataset[SampleKey(3, 2)]
    assert torch.equal(first.image, again.image) and first.index == 2
    assert not torch.equal(first.image, dataset[SampleKey(4, 2)].image)
    assert torch.equal(dataset[2].image, dataset[SampleKey(0, 2)].image)  # a bare index is epoch 0
    assert len({sample_seed(0, epoch, index) for epoch in range(20) for index in range(50)}) == 1000


@pytest.mark.parametrize(("num_samples", "world_size"), [(10, 1), (10, 3), (11, 2), (5, 4)])
def test_the_sampler_started_after_k_samples_yields_exactly_the_rest(num_samples: int, world_size: int) -> None:
    for epoch in (0, 3):
        shares = []
        for rank in range(world_size):
            sampler = TrainSampler(num_samples, rank, world_size, seed=5)
            sampler.set_epoch(epoch)
            full = list(sampler)
            assert all(key.epoch == epoch for key in full) and len(sampler) == len(full) == sampler.per_rank
            for start in range(len(full) + 1):
                sampler.set_epoch(epoch, start=start)
                assert list(sampler) == full[start:] and len(sampler) == len(full) - start
            shares.append([key.index for key in full])
            # torch's DistributedSampler order, padding included
            torch_sampler = DistributedSampler(range(num_samples), world_size, rank, shuffle=True, seed=5)
            torch_sampler.set_epoch(epoch)
            assert shares[-1] == list(torch_sampler)
        assert {index for share in shares for index in share} == set(range(num_samples))
    with pytest.raises(ValueError, match="start 99 is outside this process's share"):
        sampler.set_epoch(0, start=99)


def test_a_loader_resumed_mid_epoch_gives_the_remaining_batches(tmp_path: Path) -> None:
    """The data half of mid-epoch resume: after k batches, a fresh loader started at k x batch samples gives
    exactly the batches an uninterrupted epoch gives from batch k on (images bit-identical)."""
    root = write_image_folder(tmp_path / "images", classes=3, train_per_class=6, val_per_class=1, size=48)
    config = _config(root, "DATA.IMG_SIZE", "64", "DATA.NUM_WORKERS", "2")
    whole = _epoch_batches(build_loader(config, rank=1, world_size=2).loader_train, epoch=2)
    resumed = _epoch_batches(build_loader(config, rank=1, world_size=2).loader_train, epoch=2, start=4)
    assert len(whole) == 2
    _assert_same(whole[1:], resumed)


def test_the_same_run_with_0_1_or_4_loader_workers_ends_with_the_same_weights(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With the compute thread count fixed: without OMP_NUM_THREADS a CPU run leaves a core to each worker, and
    another thread count sums the model's reductions in another order."""
    images = write_image_folder(tmp_path / "images", classes=3, train_per_class=4, val_per_class=1, size=32)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # and no compute thread spinning on the workers' cores
    weights = []
    try:
        for workers in (0, 1, 4):
            config = write_config(tmp_path / f"w{workers}.yaml", images, tmp_path / f"w{workers}", {
                "DATA": {"NUM_WORKERS": workers}, "AUG": {"AUTO_AUGMENT": "rand-m9-mstd0.5-inc1", "REPROB": 0.25},
                "TRAIN": {"EPOCHS": 1}})
            assert main.main(["--cfg", str(config)]) == 0
            weights.append(load_weights(run_dir(tmp_path / f"w{workers}") / "latest.pth"))
    finally:
        torch.set_num_threads(threads)
    for other in weights[1:]:
        assert all(torch.equal(weights[0][name], other[name]) for name in weights[0])
