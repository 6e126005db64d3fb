"""Data: every dataset kind on generated files, transforms, mixup, sharded validation, clear errors."""

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import AugmentOp
from torchvision import transforms

from config import load_config
from data import DataError, Sample, ShardSampler, build_erasing, build_loader, build_transform, make_demo_digits
from data.datasets import decode_rgb, read_image
from data.demo import MARKER
from data.transforms import DecodingRandomResizedCrop, to_uint8_tensor

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO / "configs" / "demo" / "strip_mlp_demo.yaml")
# Small, worker-free loading for tests; mixing off unless a test turns it on.
FAST = ["DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "2", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"]


def _config(dataset: str, path: Path, num_classes: int, img_size: int = 32, extra: tuple = ()) -> object:
    opts = ["DATA.DATASET", dataset, "DATA.DATA_PATH", str(path), "MODEL.NUM_CLASSES", str(num_classes),
            "DATA.IMG_SIZE", str(img_size), *FAST, *extra]
    return load_config(DEMO_CFG, opts)


@pytest.mark.parametrize("kind", ["imagenet", "caltech101", "folder"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_folder_kinds_load_both_splits(image_folder: Callable, kind: str, fmt: str) -> None:
    root = image_folder({"cat": (3, 2), "dog": (4, 1), "eel": (2, 2)}, fmt=fmt)
    loaders = build_loader(_config(kind, root, 3, img_size=64))
    assert (len(loaders.dataset_train), len(loaders.dataset_val)) == (9, 5)
    assert loaders.dataset_train.classes == ["cat", "dog", "eel"]
    batch = next(iter(loaders.loader_train))
    assert isinstance(batch, Sample) and list(batch.bad) == ["", ""]
    assert batch.image.shape == (2, 3, 64, 64) and batch.image.dtype == torch.float32
    assert set(batch.target.tolist()) <= {0, 1, 2} and set(batch.index.tolist()) <= set(range(9))
    val_batches = list(loaders.loader_val)
    assert sorted(torch.cat([b.target for b in val_batches]).tolist()) == [0, 0, 1, 2, 2]
    assert torch.cat([b.index for b in val_batches]).tolist() == [0, 1, 2, 3, 4]
    assert loaders.mixup_fn is None


@pytest.mark.parametrize(("kind", "num_classes", "per_file", "train_size"),
                         [("cifar10", 10, 4, 20), ("cifar100", 100, 6, 6)])
def test_cifar_reads_torchvision_pickles_and_resizes(cifar_root: Callable, kind: str, num_classes: int,
                                                     per_file: int, train_size: int) -> None:
    root = cifar_root(kind, per_file=per_file)
    loaders = build_loader(_config(kind, root, num_classes, img_size=64))
    assert (len(loaders.dataset_train), len(loaders.dataset_val)) == (train_size, per_file)
    assert len(loaders.dataset_train.classes) == num_classes
    batch = next(iter(loaders.loader_val))
    assert isinstance(batch, Sample) and batch.index.tolist() == [0, 1] and list(batch.bad) == ["", ""]
    assert batch.image.shape == (2, 3, 64, 64)  # 32x32 images resized up to the input size
    assert next(iter(loaders.loader_train)).image.shape == (2, 3, 64, 64)


def test_missing_cifar_files_are_named(cifar_root: Callable, tmp_path: Path) -> None:
    root = cifar_root("cifar10")
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch; extract cifar-10-python.tar.gz"):
        build_loader(_config("cifar10", root, 10))
    with pytest.raises(DataError, match="cifar-100-python lacks train, meta"):
        build_loader(_config("cifar100", tmp_path, 100))


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): plain pickle would create the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def test_cifar_batches_are_read_without_running_code(cifar_root: Callable, tmp_path: Path) -> None:
    root = cifar_root("cifar10")
    folder = root / "cifar-10-batches-py"
    for protocol, name in ((2, "data_batch_1"), (5, "data_batch_2")):  # Python 2's protocol (the real files), and 5
        batch = pickle.loads((folder / name).read_bytes())
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    assert len(build_loader(_config("cifar10", root, 10)).dataset_train) == 20

    marker = tmp_path / "created_by_the_pickle"
    payload = {"data": _CreatesAFile(marker), "labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError) as info:
        build_loader(_config("cifar10", root, 10), train=False)
    assert not marker.exists()
    assert str(info.value) == (f"{folder / 'test_batch'} holds code (io.open), not CIFAR's arrays; nothing in "
                               "it was run. Extract cifar-10-python.tar.gz (the python version) from the official "
                               "site again")


def test_class_count_must_match_num_classes(image_folder: Callable) -> None:
    root = image_folder({"a": (2, 1), "b": (2, 1)})
    with pytest.raises(DataError, match="holds 2 classes but MODEL.NUM_CLASSES is 5"):
        build_loader(_config("folder", root, 5))


def test_train_and_val_classes_must_agree(image_folder: Callable) -> None:
    root = image_folder({"a": (2, 1), "b": (2, 1)})
    (root / "val" / "b").rename(root / "val" / "c")
    with pytest.raises(DataError, match="different classes"):
        build_loader(_config("folder", root, 2))


def test_missing_and_empty_paths_explain_the_layout(image_folder: Callable, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder; set DATA.DATA_PATH"):
        build_loader(_config("imagenet", tmp_path / "nowhere", 2))
    root = image_folder({"a": (2, 1), "b": (2, 1)})
    for image in (root / "val" / "b").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"Found no valid file for the classes b.*; expected"):
        build_loader(_config("folder", root, 2))
    train_only = image_folder({"a": (1, 0)}, name="train_only")
    shutil.rmtree(train_only / "val")
    with pytest.raises(DataError, match="val is missing; DATA.DATA_PATH must hold train/<class>/ and val/<class>/"):
        build_loader(_config("caltech101", train_only, 1))


@pytest.mark.parametrize("kind", ["imagenet", "folder"])
def test_validation_alone_needs_no_training_split(image_folder: Callable, kind: str) -> None:
    root = image_folder({"a": (1, 2), "b": (1, 1)})
    shutil.rmtree(root / "train")
    config = _config(kind, root, 2, extra=("AUG.MIXUP", "0.8", "DATA.BATCH_SIZE", "4"))
    loaders = build_loader(config, train=False)
    assert (loaders.dataset_train, loaders.loader_train, loaders.mixup_fn) == (None, None, None)
    assert len(loaders.dataset_val) == 3 and loaders.dataset_val.classes == ["a", "b"]
    assert torch.cat([batch.target for batch in loaders.loader_val]).tolist() == [0, 0, 1]
    assert list(build_loader(config, rank=1, world_size=2, train=False).loader_val.sampler) == [1]
    with pytest.raises(DataError, match="holds 2 classes but MODEL.NUM_CLASSES is 3"):
        build_loader(_config(kind, root, 3), train=False)
    with pytest.raises(DataError, match="train is missing"):
        build_loader(config)


def test_validation_alone_never_lists_the_training_folder(image_folder: Callable,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder({"a": (2, 1), "b": (2, 1)})
    listed: list[str] = []

    def spy(real: Callable) -> Callable:
        def listing(path: str = ".") -> object:
            listed.append(os.path.abspath(path))
            return real(path)
        return listing

    monkeypatch.setattr(os, "scandir", spy(os.scandir))  # ImageFolder's class scan, and os.walk below it
    monkeypatch.setattr(os, "listdir", spy(os.listdir))
    config = _config("folder", root, 2)
    build_loader(config, train=False)
    assert os.path.join(root, "val") in listed
    assert not [path for path in listed if path.startswith(str(root / "train"))]
    build_loader(config)  # the spy does see a full build list train/
    assert os.path.join(root, "train") in listed


def test_cifar_validation_alone_needs_only_the_test_file(cifar_root: Callable) -> None:
    root = cifar_root("cifar10")
    for i in range(1, 6):
        (root / "cifar-10-batches-py" / f"data_batch_{i}").unlink()
    loaders = build_loader(_config("cifar10", root, 10), train=False)
    assert loaders.dataset_train is None and len(loaders.dataset_val) == 4
    assert next(iter(loaders.loader_val)).image.shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="lacks data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5;"):
        build_loader(_config("cifar10", root, 10))


def test_batch_larger_than_a_shard_is_refused(image_folder: Callable) -> None:
    root = image_folder({"a": (3, 1), "b": (3, 1)})
    with pytest.raises(DataError, match=r"DATA.BATCH_SIZE 4 is more than the 3 training images each of the 2"):
        build_loader(_config("folder", root, 2, extra=("DATA.BATCH_SIZE", "4")), rank=0, world_size=2)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_samples", [0, 1, 10, 11])
def test_validation_shards_cover_every_sample_once(world_size: int, num_samples: int) -> None:
    shards = [list(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    seen = [index for shard in shards for index in shard]
    assert sorted(seen) == list(range(num_samples))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(shard == sorted(shard) for shard in shards)


@pytest.mark.parametrize("world_size", [2, 3])
def test_loaders_over_simulated_ranks(image_folder: Callable, world_size: int) -> None:
    root = image_folder({"a": (6, 4), "b": (6, 3), "c": (6, 4)})  # 11 val images: shards of unequal size
    val_paths, train_epochs = [], []
    for rank in range(world_size):
        loaders = build_loader(_config("folder", root, 3), rank=rank, world_size=world_size)
        samples = loaders.dataset_val.base.samples
        val_paths += [samples[i][0] for i in loaders.loader_val.sampler]
        indices = torch.cat([batch.index for batch in loaders.loader_val])
        assert indices.tolist() == list(loaders.loader_val.sampler)
        sampler = loaders.loader_train.sampler
        orders = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            orders.append([key.index for key in sampler])
        train_epochs.append(orders)
    assert sorted(val_paths) == sorted(path for path, _ in loaders.dataset_val.base.samples)
    for epoch in (0, 1):  # training shards are disjoint and cover the set (18 divides by 2 and 3)
        assert sorted(i for orders in train_epochs for i in orders[epoch]) == list(range(18))
    assert train_epochs[0][0] != train_epochs[0][1]  # re-shuffled each epoch


def test_training_transform_follows_the_release() -> None:
    """The release's timm recipe, crop and flip done while decoding, the float steps left to the device."""
    config = load_config(str(REPO / "configs" / "imagenet1k" / "strip_mlp_tiny.yaml"))
    steps = build_transform(True, config).transforms
    crop = steps[0]
    assert isinstance(crop, DecodingRandomResizedCrop)
    assert (crop.size, crop.scale, crop.ratio, crop.mode, crop.hflip) == ((224, 224), (0.08, 1.0), (3 / 4, 4 / 3),
                                                                         "bicubic", 0.5)
    release = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4,
                               hflip=0.5, re_prob=0.25, re_mode="pixel", interpolation="bicubic").transforms
    # RandAugment as the release has it (colour jitter off under RandAugment, as timm decides).
    assert isinstance(release[1], transforms.RandomHorizontalFlip) and release[1].p == crop.hflip
    assert repr(steps[1:-1]) == repr(release[2:-3])
    assert [type(step).__name__ for step in release[-3:]] == ["MaybeToTensor", "Normalize", "RandomErasing"]
    assert steps[-1] is to_uint8_tensor
    erasing = build_erasing(config, "cpu")
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.25, "pixel", 1)
    assert repr(erasing) == repr(release[-1])


def test_release_rand_augment_survives_its_strongest_posterize() -> None:
    """With 'mstd0.5' the magnitude reaches its maximum, and 'inc1' then posterizes to 0 bits (a black
    image, as in the release); Pillow 13 refuses 0 bits, which is why requirements.txt pins Pillow 12."""
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    posterized = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image)
    assert posterized.getpixel((0, 0)) == (0, 0, 0)


def test_evaluation_transform_resizes_then_centre_crops(tmp_path: Path) -> None:
    config = load_config(str(REPO / "configs" / "imagenet1k" / "strip_mlp_tiny.yaml"))
    steps = build_transform(False, config).transforms
    assert steps[0] is decode_rgb and steps[-1] is to_uint8_tensor
    assert isinstance(steps[1], transforms.Resize) and steps[1].size == 256
    assert isinstance(steps[2], transforms.CenterCrop) and steps[2].size == (224, 224)
    no_crop = load_config(str(REPO / "configs" / "imagenet1k" / "strip_mlp_tiny.yaml"), ["TEST.CROP", "False"])
    assert build_transform(False, no_crop).transforms[1].size == (224, 224)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # torchvision's JPEG decoder, and Pillow
def test_non_square_inputs_come_out_height_by_width(tmp_path: Path, fmt: str) -> None:
    """DATA.IMG_SIZE [64, 96]: training and evaluation give (3, 64, 96) uint8 from wide, tall and CIFAR-like images;
    evaluation resizes as timm does for a pair (to cover 256/224 of each side, aspect kept) and centre-crops."""
    config = load_config(DEMO_CFG, ["DATA.IMG_SIZE", "[64, 96]", "TEST.CROP", "True",
                                    "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1"])
    bicubic = transforms.InterpolationMode.BICUBIC
    # (width, height) of the image, and the size (h, w) it is resized to before the crop: scaled so that it
    # covers floor((64, 96) / (224 / 256)) = (73, 109), by the smaller of the two ratios, rounded.
    for (width, height), resized in (((120, 90), (82, 109)), ((70, 150), (234, 109))):
        path = tmp_path / f"{width}x{height}.{fmt.lower()}"
        Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy()).save(path, format=fmt)
        train, evaluate = build_transform(True, config), build_transform(False, config)
        for seed in range(4):
            torch.manual_seed(seed)
            out = train(read_image(str(path)))
            assert out.shape == (3, 64, 96) and out.dtype == torch.uint8
        out = evaluate(read_image(str(path)))
        expected = transforms.Compose([transforms.Resize(resized, interpolation=bicubic),
                                       transforms.CenterCrop((64, 96)), transforms.PILToTensor()])
        assert torch.equal(out, expected(Image.open(path).convert("RGB")))
    no_crop = load_config(DEMO_CFG, ["DATA.IMG_SIZE", "[64, 96]", "TEST.CROP", "False"])
    out = build_transform(False, no_crop)(read_image(str(path)))
    assert torch.equal(out, transforms.Compose([transforms.Resize((64, 96), interpolation=bicubic),
                                                transforms.PILToTensor()])(Image.open(path).convert("RGB")))
    cifar_like = Image.new("RGB", (32, 32), (10, 200, 30))  # decoded already, as CIFAR's images are
    assert build_transform(True, config)(cifar_like).shape == build_transform(False, config)(cifar_like).shape == (
        3, 64, 96)
    wide = load_config(DEMO_CFG, ["DATA.IMG_SIZE", "[32, 64]"])  # one side at 32: still the random resized crop
    assert build_transform(True, wide)(cifar_like).shape == (3, 32, 64)


def test_non_square_batches_take_mixup_cutmix_and_erasing(image_folder: Callable) -> None:
    root = image_folder({"a": (2, 1), "b": (2, 1)}, size=(50, 70))
    loaders = build_loader(_config("folder", root, 2, extra=("DATA.IMG_SIZE", "[64, 96]", "AUG.MIXUP", "0.8",
                                                              "AUG.CUTMIX", "1.0", "AUG.REPROB", "1.0")))
    for _ in range(3):  # mixup or cutmix, drawn per batch
        batch = next(iter(loaders.loader_train))
        assert batch.image.shape == (2, 3, 64, 96) and batch.image.dtype == torch.float32
        images, targets = loaders.mixup_fn(batch.image, batch.target)
        assert images.shape == (2, 3, 64, 96) and targets.shape == (2, 2)
    assert torch.cat([b.image for b in loaders.loader_val]).shape == (2, 3, 64, 96)


def test_mixup_follows_the_aug_keys(image_folder: Callable) -> None:
    root = image_folder({"a": (2, 1), "b": (2, 1)})
    mixed = build_loader(_config("folder", root, 2, extra=("AUG.MIXUP", "0.8", "AUG.CUTMIX", "1.0")))
    assert isinstance(mixed.mixup_fn, Mixup)
    assert mixed.mixup_fn.label_smoothing == 0.1 and mixed.mixup_fn.num_classes == 2
    batch = next(iter(mixed.loader_train))
    images, targets = mixed.mixup_fn(batch.image, batch.target)
    assert targets.shape == (2, 2) and torch.allclose(targets.sum(1), torch.ones(2))
    cutmix_box = build_loader(_config("folder", root, 2, extra=("AUG.CUTMIX_MINMAX", "[0.3, 0.7]")))
    assert cutmix_box.mixup_fn is not None


def test_demo_dataset_is_made_once_and_reused(tmp_path: Path) -> None:
    dst = tmp_path / "digits"
    assert make_demo_digits(str(dst)) is True
    train = sorted(p.relative_to(dst) for p in (dst / "train").rglob("*.png"))
    val = sorted(p.relative_to(dst) for p in (dst / "val").rglob("*.png"))
    assert len(train) + len(val) == 1797 and len(train) == sum(int(n * 0.8) for n in
                                                               (178, 182, 177, 183, 181, 182, 181, 179, 174, 180))
    assert not {p.name for p in train} & {p.name for p in val}
    stamp = (dst / MARKER).stat().st_mtime_ns
    assert make_demo_digits(str(dst)) is False and (dst / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="made with"):
        make_demo_digits(str(dst), seed=1)


def test_demo_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="is not a demo dataset"):
        make_demo_digits(str(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_demo_config_makes_its_data_on_first_use(tmp_path: Path) -> None:
    config = load_config(DEMO_CFG, ["DATA.DATA_PATH", str(tmp_path / "demo"), "DATA.NUM_WORKERS", "0"])
    loaders = build_loader(config)
    assert len(loaders.dataset_train) + len(loaders.dataset_val) == 1797
    assert next(iter(loaders.loader_train)).image.shape == (config.DATA.BATCH_SIZE, 3, 32, 32)
    assert loaders.mixup_fn is None

