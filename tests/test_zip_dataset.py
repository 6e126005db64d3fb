"""Packed datasets (DATA.ZIP_MODE): tools/make_zip_dataset.py, the same batches as the folder tree, each cache
mode, unreadable members, and one-line errors for broken archives and map files."""

import io
import os
import random
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from config import load_config
from data import DataError, ZipImageFolder, build_dataset, build_loader
from data import zipped as zipped_module

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO / "configs" / "demo" / "strip_mlp_demo.yaml")
sys.path.insert(0, str(REPO / "tools"))
import make_zip_dataset  # noqa: E402  (tools/ is a folder of scripts, not a package)

# Every random augmentation of the release on (RandAugment, flip, random erasing); 64 px uses the random crop.
AUGMENT = ["AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.HFLIP", "0.5", "AUG.REPROB", "0.25", "DATA.BATCH_SIZE", "3",
           "DATA.NUM_WORKERS", "0", "DATA.IMG_SIZE", "64"]
COUNTS = {"ant": (4, 2), "bee": (3, 2), "cat": (5, 1)}


def _config(path: Path, *opts: str) -> object:
    return load_config(DEMO_CFG, ["DATA.DATASET", "imagenet", "DATA.DATA_PATH", str(path), "MODEL.NUM_CLASSES", "3",
                                  *AUGMENT, *opts])


@pytest.fixture
def trees(image_folder: Callable, tmp_path: Path) -> tuple[Path, Path]:
    """(a JPEG image-folder tree, the same packed by the tool)."""
    src = image_folder(COUNTS, size=(72, 56), fmt="JPEG")
    assert make_zip_dataset.main([str(src), str(tmp_path / "packed")]) == 0
    return src, tmp_path / "packed"


def _epoch(loader: object, epoch: int) -> list:
    """Every batch of an epoch, the main process's RNGs seeded first (random erasing draws from them)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    random.seed(epoch)
    torch.manual_seed(epoch)
    return list(loader)


def _assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.image, y.image) and torch.equal(x.target, y.target) and torch.equal(x.index, y.index)
        assert x.bad == y.bad


def test_packed_tree_gives_the_same_batches_as_the_folder_tree(trees: tuple[Path, Path]) -> None:
    src, packed = trees
    assert sorted(p.name for p in packed.iterdir()) == ["train.zip", "train_map.txt", "val.zip", "val_map.txt"]
    assert (packed / "train_map.txt").read_text().splitlines()[:2] == ["ant/img_000.jpg\t0", "ant/img_001.jpg\t0"]
    with zipfile.ZipFile(packed / "val.zip") as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        assert archive.read("bee/img_001.jpg") == (src / "val" / "bee" / "img_001.jpg").read_bytes()
    folders, zips = build_loader(_config(src)), build_loader(_config(packed, "DATA.ZIP_MODE", "True"))
    assert isinstance(zips.dataset_train.base, ZipImageFolder)
    assert zips.dataset_train.classes == folders.dataset_train.classes == ["ant", "bee", "cat"]
    assert zips.dataset_val.classes == folders.dataset_val.classes
    assert zips.dataset_train.base.targets == [label for _, label in folders.dataset_train.base.samples]
    for epoch in (0, 1):
        _assert_same_batches(_epoch(folders.loader_train, epoch), _epoch(zips.loader_train, epoch))
    _assert_same_batches(_epoch(folders.loader_val, 0), _epoch(zips.loader_val, 0))
    assert zips.dataset_val.base.samples[0] == (f"{packed / 'val.zip'}@/ant/img_000.jpg", 0)


@pytest.mark.parametrize("mode", ["no", "part", "full"])
def test_each_cache_mode_reads_the_same_samples_and_caches_its_share(trees: tuple[Path, Path], mode: str) -> None:
    _, packed = trees
    reference = [build_loader(_config(packed, "DATA.ZIP_MODE", "True"), rank, 2) for rank in (0, 1)]
    for rank in (0, 1):
        loaders = build_loader(_config(packed, "DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", mode), rank, 2)
        train, val = loaders.dataset_train.base, loaders.dataset_val.base
        cached_train = [int(i) for i in (train.cache_starts >= 0).nonzero()[0]]
        cached_val = [int(i) for i in (val.cache_starts >= 0).nonzero()[0]]
        expected_train = {"no": [], "part": list(range(rank, 12, 2)), "full": list(range(12))}[mode]
        expected_val = {"no": [], "part": list(loaders.loader_val.sampler), "full": list(range(5))}[mode]
        assert (cached_train, cached_val) == (expected_train, expected_val)
        if mode == "part":  # each process trains on the shard it cached, every epoch
            for epoch in (0, 1):
                loaders.loader_train.sampler.set_epoch(epoch)
                assert {key.index % 2 for key in loaders.loader_train.sampler} == {rank}
        else:
            _assert_same_batches(_epoch(reference[rank].loader_train, 1), _epoch(loaders.loader_train, 1))
        _assert_same_batches(_epoch(reference[rank].loader_val, 0), _epoch(loaders.loader_val, 0))
    if mode == "full":  # cached members never touch the archive again
        os.rename(packed / "train.zip", packed / "moved.zip")
        assert [sample.bad for sample in (loaders.dataset_train[i] for i in range(12))] == [""] * 12


def test_the_archive_is_opened_once_per_process(trees: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, packed = trees
    dataset = ZipImageFolder(str(packed), "train")
    opened = []
    real_open = open

    def spy(path: str, *args: object, **kwargs: object) -> object:
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(zipped_module, "open", spy, raising=False)
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert image.data == (trees[0] / "train" / image.name.split("@/")[1]).read_bytes()
    assert opened == [dataset.zip_path]
    monkeypatch.setattr(os, "getpid", lambda: -5)  # as a forked loader worker sees it
    dataset[0]
    assert opened == [dataset.zip_path] * 2


def test_unreadable_members_are_passed_over_like_unreadable_files(image_folder: Callable, tmp_path: Path) -> None:
    src = image_folder({"ant": (2, 3), "bee": (1, 1)}, size=(72, 56), fmt="JPEG")
    truncated = src / "val" / "ant" / "img_001.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    assert make_zip_dataset.main([str(src), str(tmp_path / "packed")]) == 0
    archive = tmp_path / "packed" / "val.zip"
    with zipfile.ZipFile(archive) as opened:
        info = opened.getinfo("ant/img_002.jpg")
    damaged = bytearray(archive.read_bytes())
    damaged[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF  # a byte inside the member's data
    archive.write_bytes(bytes(damaged))

    dataset = build_dataset(False, _config(tmp_path / "packed", "DATA.ZIP_MODE", "True"))
    samples = [dataset[i] for i in range(4)]
    assert samples[1].bad.startswith(f"{archive}@/ant/img_001.jpg: OSError: image file is truncated")
    assert samples[2].bad == f"{archive}@/ant/img_002.jpg: BadZipFile: CRC-32 mismatch: the member's bytes are damaged"
    assert samples[0].bad == samples[3].bad == ""
    assert torch.equal(samples[1].image, samples[3].image) and samples[1].target == 1  # both replaced by bee's


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _patch_directory(archive: Path, member: str, field: int, value: int) -> None:
    """Overwrite one 4-byte field of a member's entry in the archive's central directory (20: compressed size,
    24: uncompressed size), leaving its local header and data as they were."""
    data = bytearray(archive.read_bytes())
    entry = data.rindex(member.encode()) - 46  # the name follows the 46-byte fixed part; the directory comes last
    assert data[entry:entry + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, entry + field, value)
    archive.write_bytes(bytes(data))


def test_zip_bombs_are_unreadable_images_without_being_inflated(tmp_path: Path) -> None:
    """A member declaring more than DATA.ZIP_MAX_MEMBER_MB, and one inflating past the size its directory declares,
    are named and passed over; neither is inflated beyond its declared size."""
    zeros = bytes(24 * 2**20)  # deflates to about 24 KB
    packed = tmp_path / "packed"
    packed.mkdir()
    members = {"ant/a.png": _png((200, 0, 0)), "ant/bomb.png": zeros, "ant/liar.png": zeros,
               "bee/b.png": _png((0, 0, 9))}
    with zipfile.ZipFile(packed / "val.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    (packed / "val_map.txt").write_text("ant/a.png\t0\nant/bomb.png\t0\nant/liar.png\t0\nbee/b.png\t1\n")
    _patch_directory(packed / "val.zip", "ant/liar.png", 24, 1000)  # declares 1000 bytes, inflates to 24 MiB
    assert (packed / "val.zip").stat().st_size < 2**20

    dataset = build_dataset(False, _config(packed, "DATA.ZIP_MODE", "True", "DATA.ZIP_MAX_MEMBER_MB", "1"))
    samples = [dataset[i] for i in range(4)]
    where = f"{packed / 'val.zip'}@/ant"
    bomb = f"{where}/bomb.png: BadZipFile: it declares 24.0 MiB uncompressed, more than DATA.ZIP_MAX_MEMBER_MB 1"
    liar = (f"{where}/liar.png: BadZipFile: it inflates past the 1000 bytes its directory declares (a damaged "
            "archive or a zip bomb)")
    assert [sample.bad for sample in samples] == ["", f"{bomb}\n{liar}", liar, ""]
    assert [sample.target for sample in samples] == [0, 1, 1, 1]  # both passed over for bee's image


def test_a_size_field_running_past_the_archive_marks_its_member_when_the_dataset_is_built(trees: tuple[Path, Path]
                                                                                         ) -> None:
    _, packed = trees
    archive = packed / "val.zip"
    with zipfile.ZipFile(archive) as opened:
        offset = opened.getinfo("bee/img_000.jpg").header_offset
        data_end = opened.start_dir
    _patch_directory(archive, "bee/img_000.jpg", 20, 10**8)  # 100 MB compressed, in an archive of a few KB
    loaders = build_loader(_config(packed, "DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", "full"), train=False)
    dataset = loaders.dataset_val
    assert dataset.base.bad_members == {2: f"its directory entry declares 100000000 bytes at offset {offset}, past "
                                           f"the {data_end} bytes of member data; the archive's directory is damaged"}
    assert dataset.base.cache_buffer.nbytes < archive.stat().st_size  # the 100 MB were never allocated
    samples = [dataset[i] for i in range(5)]
    assert samples[2].bad == f"{archive}@/bee/img_000.jpg: BadZipFile: {dataset.base.bad_members[2]}"
    assert [sample.bad for sample in samples].count("") == 4


def test_swins_flat_validation_map_takes_the_class_names_of_the_training_map(trees: tuple[Path, Path]) -> None:
    _, packed = trees
    with zipfile.ZipFile(packed / "val.zip") as old, zipfile.ZipFile(packed / "flat.zip", "w") as new:
        for info in old.infolist():
            new.writestr(info.filename.replace("/", "_"), old.read(info))
    os.replace(packed / "flat.zip", packed / "val.zip")
    lines = (packed / "val_map.txt").read_text().splitlines()
    (packed / "val_map.txt").write_text("".join(line.replace("/", "_") + "\n" for line in lines))
    loaders = build_loader(_config(packed, "DATA.ZIP_MODE", "True"), train=False)
    assert loaders.dataset_val.classes == ["ant", "bee", "cat"]
    assert [loaders.dataset_val[i].target for i in range(5)] == [0, 0, 1, 1, 2]


def _line(path: Path, text: str) -> None:
    path.write_text(text)


# How to break a packed tree, and the start of the one-line DataError it gives.
BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing archive": (lambda p: (p / "train.zip").unlink(), "zip mode: {p}/train.zip is missing; DATA.DATA_PATH"),
    "missing map": (lambda p: (p / "val_map.txt").unlink(), "zip mode: {p}/val_map.txt is missing"),
    "no tab": (lambda p: _line(p / "train_map.txt", "ant/img_000.jpg 0\n"),
               "{p}/train_map.txt line 1: expected 'PATH<TAB>LABEL' with a label of 0 or more, got "
               "'ant/img_000.jpg 0'"),
    "bad label": (lambda p: _line(p / "train_map.txt", "ant/img_000.jpg\t0\n\nant/img_001.jpg\t-1\n"),
                  "{p}/train_map.txt line 3: expected 'PATH<TAB>LABEL'"),
    "empty map": (lambda p: _line(p / "val_map.txt", "\n"), "{p}/val_map.txt lists no images"),
    "not in archive": (lambda p: _line(p / "val_map.txt", "ant/img_000.jpg\t0\nant/nope.jpg\t0\n"),
                       "{p}/val_map.txt line 2: ant/nope.jpg is not in {p}/val.zip; the map and the archive"),
    "not a zip": (lambda p: _line(p / "val.zip", "text"), "{p}/val.zip is not a readable zip archive (BadZipFile"),
    "two labels": (lambda p: _line(p / "val_map.txt", "ant/img_000.jpg\t0\nant/img_001.jpg\t1\n"),
                   "{p}/val_map.txt: the images of ant/ have several labels"),
    "shared label": (lambda p: _line(p / "val_map.txt", "ant/img_000.jpg\t0\nbee/img_000.jpg\t0\n"),
                     "{p}/val_map.txt: label 0 is given to images of both ant/ and bee/"),
    "label gap": (lambda p: _line(p / "val_map.txt", "ant/img_000.jpg\t0\nbee/img_000.jpg\t2\n"),
                  "{p}/val_map.txt: labels must be 0..1, one per class folder, but [1] are missing"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_broken_archives_and_map_files_give_one_line_errors(trees: tuple[Path, Path], name: str) -> None:
    _, packed = trees
    breaker, message = BREAKS[name]
    breaker(packed)
    with pytest.raises(DataError) as caught:
        build_loader(_config(packed, "DATA.ZIP_MODE", "True"))
    assert str(caught.value).startswith(message.format(p=packed)) and "\n" not in str(caught.value)


def test_zip_mode_is_refused_for_data_that_is_not_image_folders(tmp_path: Path) -> None:
    config = load_config(DEMO_CFG, ["DATA.DATASET", "cifar10", "DATA.DATA_PATH", str(tmp_path), "DATA.ZIP_MODE", "True",
                                    "MODEL.NUM_CLASSES", "10"])
    with pytest.raises(DataError, match="DATA.ZIP_MODE reads packed image folders .imagenet, caltech101, folder., "
                                        "not cifar10; set DATA.ZIP_MODE False"):
        build_loader(config)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_the_tool_never_modifies_the_source_and_refuses_what_it_would_overwrite(image_folder: Callable,
                                                                                tmp_path: Path, capsys) -> None:
    src = image_folder({"ant": (2, 1), "bee": (1, 1)})
    (src / "train" / "ant" / "notes.txt").write_text("not an image")  # ImageFolder leaves it out; so does the tool
    before = _snapshot(src)
    assert make_zip_dataset.main([str(src), str(tmp_path / "out")]) == 0
    assert "train: 3 images of 2 classes" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "out" / "train.zip") as archive:
        assert archive.namelist() == ["ant/img_000.png", "ant/img_001.png", "bee/img_000.png"]
    assert _snapshot(src) == before
    packed = _snapshot(tmp_path / "out")
    refusals = [
        ([str(src), str(tmp_path / "out")], f"destination {tmp_path / 'out'} exists and is not an empty folder"),
        ([str(src), str(src / "packed")], f"destination {src / 'packed'} is inside the source {src}"),
        ([str(tmp_path / "none"), str(tmp_path / "new")], f"source {tmp_path / 'none'} is not a folder"),
        ([str(src / "train"), str(tmp_path / "new")], f"source {src / 'train'} holds neither train/ nor val/"),
    ]
    for args, message in refusals:
        with pytest.raises(make_zip_dataset.PackError) as refused:
            make_zip_dataset.main(args)
        assert str(refused.value).startswith(message)
    assert _snapshot(src) == before and _snapshot(tmp_path / "out") == packed
    assert not (src / "packed").exists() and not (tmp_path / "new").exists()
