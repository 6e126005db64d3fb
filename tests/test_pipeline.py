"""The input pipeline: augmentation as a function of (seed, epoch, index) whatever the worker count, the
resumable training sampler, the device-side step against the release's float pipeline, and the faster crop
against the release's for the same random draws."""

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import load_weights, run_dir, write_config, write_image_folder
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DistributedSampler
from torchvision import transforms

import main
from config import load_config
from data import DeviceLoader, Sample, SampleKey, TrainSampler, build_erasing, build_loader, build_transform
from data.datasets import read_image
from data.samples import sample_seed
from data.transforms import DecodingRandomResizedCrop, to_uint8_tensor

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO / "configs" / "demo" / "strip_mlp_demo.yaml")
# The release's random augmentations, all on.
RELEASE_AUG = ["AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.HFLIP", "0.5", "AUG.REPROB", "0.25",
               "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"]


def _config(path: Path, *opts: str) -> object:
    return load_config(DEMO_CFG, ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(path), "MODEL.NUM_CLASSES", "3",
                                  "DATA.BATCH_SIZE", "4", *RELEASE_AUG, *opts])


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (gradients, discs, mild noise): resampling differences show on it as on
    photographs, unlike on white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6)]
        waves = np.sin(fx * 2 * np.pi * x / width + phase) * np.cos(fy * 2 * np.pi * y / height)
        pixels[..., channel] = 128 + 90 * waves
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * min(width, height)
        pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _epoch_batches(loader: DeviceLoader, epoch: int, start: int = 0) -> list[Sample]:
    """The batches of an epoch from ``start``, the main process's RNGs re-seeded before each batch is fetched
    (random erasing draws from them then), as a training loop that re-seeds per step does."""
    loader.sampler.set_epoch(epoch, start=start)
    first_step = start // loader.loader.batch_size
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
    assert torch.equal(first.image, again.image) and first.image.dtype == torch.uint8 and first.index == 2
    assert not torch.equal(first.image, dataset[SampleKey(4, 2)].image)
    assert torch.equal(dataset[2].image, dataset[SampleKey(0, 2)].image)  # a bare index is epoch 0
    assert len({sample_seed(0, epoch, index) for epoch in range(20) for index in range(50)}) == 1000


@pytest.mark.parametrize("fixed_shards", [False, True])
@pytest.mark.parametrize(("num_samples", "world_size"), [(10, 1), (10, 3), (11, 2), (5, 4)])
def test_the_sampler_started_after_k_samples_yields_exactly_the_rest(num_samples: int, world_size: int,
                                                                     fixed_shards: bool) -> None:
    for epoch in (0, 3):
        shares = []
        for rank in range(world_size):
            sampler = TrainSampler(num_samples, rank, world_size, seed=5, fixed_shards=fixed_shards)
            sampler.set_epoch(epoch)
            full = list(sampler)
            assert all(key.epoch == epoch for key in full) and len(sampler) == len(full) == sampler.per_rank
            for start in range(len(full) + 1):
                sampler.set_epoch(epoch, start=start)
                assert list(sampler) == full[start:] and len(sampler) == len(full) - start
            shares.append([key.index for key in full])
            if fixed_shards:
                assert sorted(set(shares[-1])) == list(range(rank, num_samples, world_size))
            else:  # torch's DistributedSampler order, padding included
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


def test_the_device_step_equals_the_release_float_pipeline() -> None:
    """Without erasing: ToTensor and Normalize's result, bit for bit, in either memory format."""
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(3)]
    release = transforms.Compose([transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    expected = torch.stack([release(picture) for picture in pictures])
    batch = Sample(torch.stack([transforms.PILToTensor()(p) for p in pictures]), torch.tensor([0, 1, 2]),
                   torch.arange(3), ("", "", ""))
    for memory_format in (torch.contiguous_format, torch.channels_last):
        out = DeviceLoader([batch], "cpu", memory_format=memory_format)
        (prepared,) = list(out)
        assert prepared.image.dtype == torch.float32 and prepared.image.is_contiguous(memory_format=memory_format)
        assert torch.equal(prepared.image, expected)
        assert torch.equal(prepared.target, batch.target) and prepared.bad == batch.bad


def test_uint8_conversion_equals_torchvisions() -> None:
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8))
    assert torch.equal(to_uint8_tensor(picture), transforms.PILToTensor()(picture))


def test_validation_batches_equal_the_release_evaluation_pipeline(image_folder: Callable) -> None:
    root = image_folder({"a": (1, 3), "b": (1, 2), "c": (1, 1)}, size=(90, 70), fmt="JPEG")
    config = _config(root, "DATA.IMG_SIZE", "64", "TEST.CROP", "True", "DATA.NUM_WORKERS", "0")
    loaders = build_loader(config, train=False)
    assert loaders.loader_val.erasing is None
    release = transforms.Compose([transforms.Resize(73, interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(64), transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    expected = [release(Image.open(path).convert("RGB")) for path, _ in loaders.dataset_val.base.samples]
    assert torch.equal(torch.cat([batch.image for batch in loaders.loader_val]), torch.stack(expected))


def test_random_erasing_on_the_device_follows_the_configured_probability(tmp_path: Path) -> None:
    grey = Sample(torch.full((64, 3, 32, 32), 128, dtype=torch.uint8), torch.zeros(64), torch.arange(64), ("",) * 64)
    plain = DeviceLoader([grey], "cpu").prepare(grey).image  # (64, 3, 32, 32), normalised only
    loader = DeviceLoader([grey] * 40, "cpu", erasing=build_erasing(_config(tmp_path), "cpu"))
    torch.manual_seed(0)
    random.seed(0)
    images = torch.cat([batch.image for batch in loader])  # (2560, 3, 32, 32)
    erased_area = (images != plain[:1]).any(1).flatten(1).float().mean(1)  # (2560,) fraction of each image erased
    rate = (erased_area > 0).float().mean().item()
    assert abs(rate - 0.25) < 4 * (0.25 * 0.75 / len(images)) ** 0.5, rate  # AUG.REPROB, within 4 standard errors
    erased = erased_area[erased_area > 0]
    assert erased.min() >= 0.015 and erased.max() <= 1 / 3 + 0.02  # timm's box area range, 2% to a third
    torch.manual_seed(0)
    random.seed(0)
    assert torch.equal(torch.cat([batch.image for batch in loader]), images)  # the main process's RNGs decide
    assert build_erasing(_config(tmp_path, "AUG.REPROB", "0.0"), "cpu") is None


def _release_crop(size: int, scale: tuple[float, float]) -> RandomResizedCropAndInterpolation:
    return RandomResizedCropAndInterpolation(size, scale=scale, interpolation="bicubic")


@pytest.mark.parametrize("seed", range(6))
def test_the_crop_equals_the_release_crop_for_the_same_draws(tmp_path: Path, seed: int) -> None:
    """Same box (timm's draws), torch's antialiased bicubic instead of Pillow's: equal but for +-2 on a few pixels."""
    path = tmp_path / "photo.jpg"
    _photo(300 + 20 * seed, 240, seed).save(path, quality=90)
    release, ours = _release_crop(64, (0.08, 1.0)), DecodingRandomResizedCrop(_release_crop(64, (0.08, 1.0)))
    random.seed(seed)
    expected = np.asarray(release(Image.open(path).convert("RGB")), dtype=np.int16)
    random.seed(seed)
    found = np.asarray(ours(read_image(str(path))), dtype=np.int16)
    assert found.shape == expected.shape == (64, 64, 3)
    difference = np.abs(found - expected)
    assert difference.max() <= 2 and (difference > 0).mean() < 0.01


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_torchvision_and_pillow_decode_jpegs_to_the_same_crop(tmp_path: Path, mode: str) -> None:
    """A JPEG goes through torchvision's decoder; a decoded Pillow image (CIFAR's) through Pillow: same pixels."""
    path = tmp_path / "photo.jpg"
    _photo(200, 150, 1).convert(mode).save(path, quality=90)
    crop = DecodingRandomResizedCrop(_release_crop(64, (0.08, 1.0)), hflip=0.5)
    for seed in range(4):
        random.seed(seed)
        torch.manual_seed(seed)
        by_torchvision = np.asarray(crop(read_image(str(path))))
        random.seed(seed)
        torch.manual_seed(seed)
        by_pillow = np.asarray(crop(Image.open(path).convert("RGB")))
        assert np.array_equal(by_torchvision, by_pillow)


def test_a_truncated_training_jpeg_is_named_with_pillows_reason(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", classes=3, train_per_class=2, val_per_class=1, size=48)
    photo = root / "train" / "class_0" / "1.png"
    _photo(120, 100, 2).save(photo.with_suffix(".jpg"), quality=90)
    photo.unlink()
    truncated = photo.with_suffix(".jpg")
    truncated.write_bytes(truncated.read_bytes()[:1500])
    dataset = build_loader(_config(root, "DATA.IMG_SIZE", "64", "DATA.NUM_WORKERS", "0")).dataset_train
    sample = dataset[SampleKey(0, 1)]
    assert sample.bad.startswith(f"{truncated}: OSError: image file is truncated") and sample.target == 1


def test_large_crops_decode_at_reduced_size_within_a_small_difference(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A crop of at least 2 x 2 = 4 times the output decodes at half size (a scaled inverse DCT), then resizes."""
    path = tmp_path / "large.jpg"
    _photo(1000, 960, 3).save(path, quality=90)
    decoded_sizes = []
    import data.transforms as transforms_module

    real_decode = transforms_module.decode_rgb
    monkeypatch.setattr(transforms_module, "decode_rgb", lambda image: decoded_sizes.append(image.size) or
                        real_decode(image))
    release, ours = _release_crop(224, (0.95, 1.0)), DecodingRandomResizedCrop(_release_crop(224, (0.95, 1.0)))
    for seed in range(3):
        random.seed(seed)
        expected = np.asarray(release(Image.open(path).convert("RGB")), dtype=np.float32)
        random.seed(seed)
        found = np.asarray(ours(read_image(str(path))), dtype=np.float32)
        difference = np.abs(found - expected)
        assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 6, (difference.mean(), difference.max())
    assert decoded_sizes == [(500, 480)] * 3
    assert ours.draft_reduction(895, 2000) == 1 and ours.draft_reduction(896, 896) == 2
    assert ours.draft_reduction(3584, 3600) == 8


@pytest.mark.parametrize("hflip", [0.5, 0.0])
def test_the_training_transform_draws_as_the_release_does(tmp_path: Path, hflip: float) -> None:
    """Whole recipe, RandAugment on: the same crops, flips and RandAugment operations for the same seed (the
    images differ only where the resampling's +-2 passes through an operation)."""
    config = _config(tmp_path, "DATA.IMG_SIZE", "64", "AUG.HFLIP", str(hflip))
    ours = build_transform(True, config)
    release = create_transform(64, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", hflip=hflip,
                               interpolation="bicubic", use_prefetcher=True)
    path = tmp_path / "photo.jpg"
    _photo(160, 120, 0).save(path, quality=90)
    for seed in range(20):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        expected = release(Image.open(path).convert("RGB")).to(torch.int16)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        found = ours(read_image(str(path)))
        assert found.dtype == torch.uint8 and found.shape == (3, 64, 64)
        assert (found.to(torch.int16) - expected).abs().float().mean() < 1.0, seed


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
