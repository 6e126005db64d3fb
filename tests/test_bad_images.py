"""Unreadable images: passed over with their path and reason in Sample.bad, never raised, up to a bound."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import write_images
from PIL import Image
from torch.utils.data import DataLoader

from config import BAD_IMAGE_POLICIES, load_config
from data import DataError, Sample, build_dataset
from data.samples import max_consecutive_bad

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO / "configs" / "demo" / "strip_mlp_demo.yaml")


def _truncated_jpeg(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _decompression_bomb(path: Path) -> None:
    # 40,000 pixels: over twice the limit the test sets (5,000), where Pillow raises instead of warning.
    Image.new("RGB", (200, 200)).save(path, format="PNG")


# How to break an image file, and the start of the reason Sample.bad gives for it.
BREAKERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated_jpeg": (_truncated_jpeg, "OSError: image file is truncated"),
    "text_named_jpg": (lambda path: path.write_text("not a picture"), "UnidentifiedImageError: cannot identify"),
    "zero_bytes": (lambda path: path.write_bytes(b""), "UnidentifiedImageError: cannot identify"),
    "decompression_bomb": (_decompression_bomb, "DecompressionBombError: Image size (40000 pixels) exceeds limit"),
    "dangling_link": (lambda path: (path.unlink(), path.symlink_to(path.with_name("gone.jpg"))),
                      "FileNotFoundError: [Errno 2] No such file or directory"),
}


def _val_split(root: Path, per_class: dict[str, int]) -> list[Path]:
    """Write val/<class>/img_NNN.jpg (and an empty train/) under ``root``; return the files in dataset order."""
    paths = []
    for seed, (label, count) in enumerate(sorted(per_class.items())):
        paths += write_images(root / "val" / label, count, (40, 30), "JPEG", seed)
    return paths


def _val_dataset(root: Path, num_classes: int) -> object:
    config = load_config(DEMO_CFG, ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(root),
                                    "MODEL.NUM_CLASSES", str(num_classes), "DATA.NUM_WORKERS", "0"])
    return build_dataset(False, config)


def _by_index(dataset: object, workers: int) -> dict[int, tuple[torch.Tensor, int, str]]:
    """{index: (image, target, bad)} of every sample, read in batches of 2 through a DataLoader."""
    found = {}
    for batch in DataLoader(dataset, batch_size=2, num_workers=workers):
        assert isinstance(batch, Sample) and isinstance(batch.index, torch.Tensor)
        for image, target, index, bad in zip(*batch, strict=True):
            found[int(index)] = (image, int(target), bad)
    return found


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("breaker", list(BREAKERS))
def test_unreadable_image_is_replaced_by_the_next_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            breaker: str, workers: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # the readable images have 1,200 pixels
    paths = _val_split(tmp_path, {"a": 3, "b": 2})
    write, reason = BREAKERS[breaker]
    write(paths[2])  # the last image of class a; its replacement is the first of class b
    dataset = _val_dataset(tmp_path, 2)
    assert len(dataset) == 5 and dataset.classes == ["a", "b"]

    samples = _by_index(dataset, workers)
    assert sorted(samples) == [0, 1, 2, 3, 4]
    assert [bad for _, _, bad in samples.values()] == ["", "", samples[2][2], "", ""]
    assert samples[2][2].startswith(f"{paths[2]}: {reason}") and "\n" not in samples[2][2]
    image, target, _ = samples[2]
    assert target == 1 and torch.equal(image, samples[3][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_consecutive_bad_files_and_the_end_of_the_split_wrap_around(tmp_path: Path, workers: int) -> None:
    paths = _val_split(tmp_path, {"a": 4, "b": 3})
    for index in (1, 2, 5, 6):  # two in a row inside the split, two in a row at its end
        paths[index].write_bytes(b"")
    samples = _by_index(_val_dataset(tmp_path, 2), workers)

    def bad_lines(*indices: int) -> list[str]:
        return [f"{paths[i]}: UnidentifiedImageError: cannot identify image file '{paths[i]}'" for i in indices]

    assert samples[1][2].splitlines() == bad_lines(1, 2)
    assert samples[2][2].splitlines() == bad_lines(2)
    assert samples[5][2].splitlines() == bad_lines(5, 6)
    assert samples[6][2].splitlines() == bad_lines(6)
    for index, replacement in ((1, 3), (2, 3), (5, 0), (6, 0)):  # 5 and 6 wrap around to the first image
        assert torch.equal(samples[index][0], samples[replacement][0])
        assert samples[index][1] == samples[replacement][1]
    assert all(samples[i][2] == "" for i in (0, 3, 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_transform_still_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    def broken_transform(image: Image.Image) -> torch.Tensor:
        raise OSError("a bug in a transform")  # the same type as Pillow's decode errors: it must not be caught

    monkeypatch.setattr("data.build.build_transform", lambda is_train, config: broken_transform)
    _val_split(tmp_path, {"a": 2})
    dataset = _val_dataset(tmp_path, 1)
    with pytest.raises(OSError, match="a bug in a transform"):
        next(iter(DataLoader(dataset, batch_size=2, num_workers=workers)))


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_unreadable_files_in_a_row_stop_with_one_line(tmp_path: Path, workers: int) -> None:
    assert [max_consecutive_bad(n) for n in (3, 10, 500, 5000)] == [3, 10, 10, 50]
    paths = _val_split(tmp_path, {"a": 13})
    for path in paths[:10]:
        path.write_bytes(b"")
    dataset = _val_dataset(tmp_path, 1)
    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(dataset, batch_size=2, num_workers=workers)))
    message = str(caught.value)
    if workers:  # torch puts "Caught DataError in DataLoader worker process N" and the traceback before the line
        message = message.splitlines()[-1].removeprefix("data.datasets.DataError: ")
    assert "\n" not in message
    assert message.startswith(f"10 image files in a row cannot be read, the first {paths[0]}: UnidentifiedImageError")
    assert message.endswith("; check the disk / DATA.DATA_PATH")
    assert dataset[1].bad.splitlines() == [f"{p}: UnidentifiedImageError: cannot identify image file '{p}'"
                                           for p in paths[1:10]]  # nine in a row are still passed over


def test_a_split_of_only_unreadable_files_stops_instead_of_circling(tmp_path: Path) -> None:
    for path in _val_split(tmp_path, {"a": 3}):
        path.write_text("not an image")
    with pytest.raises(DataError, match=r"^3 image files in a row cannot be read"):
        _val_dataset(tmp_path, 1)[2]


def test_the_policy_key_takes_the_data_packages_choices() -> None:
    from config import CHOICES, ConfigError, default_config

    assert CHOICES["DATA.BAD_IMAGE"] is BAD_IMAGE_POLICIES == ("skip", "error")
    assert default_config().DATA.BAD_IMAGE == "skip"
    assert load_config(DEMO_CFG, ["DATA.BAD_IMAGE", "error"]).DATA.BAD_IMAGE == "error"
    with pytest.raises(ConfigError, match="DATA.BAD_IMAGE 'ignore' is not supported; choose one of: skip, error"):
        load_config(DEMO_CFG, ["DATA.BAD_IMAGE", "ignore"])
