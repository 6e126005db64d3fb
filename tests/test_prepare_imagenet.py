"""tools/prepare_imagenet.py on a fake flat validation folder, labelled by a devkit archive or Kaggle's CSV."""

import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.imagenet
from conftest import write_images
from run_helpers import write_config

from config import load_config
from data import DataError, build_dataset
from utils import RunError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import prepare_imagenet  # noqa: E402  (tools/ is a folder of scripts, not a package)

WNIDS = ["n01440764", "n01443537", "n01484850"]
TRUTH = [1, 3, 2, 1, 2, 3, 3]  # ILSVRC2012_IDs of val images 1..7: two of class 1 and 2, three of class 3


def flat_val(root: Path, count: int = len(TRUTH)) -> Path:
    """ILSVRC2012_val_00000001.JPEG ... in one folder."""
    for path in write_images(root, count, (12, 10), "JPEG", seed=0):
        path.rename(root / f"ILSVRC2012_val_{int(path.stem.split('_')[1]) + 1:08d}.JPEG")
    return root


def write_csv_labels(path: Path, truth: list[int] = TRUTH) -> Path:
    rows = [f"ILSVRC2012_val_{n:08d},{WNIDS[c - 1]} 1 2 30 40 {WNIDS[c - 1]} 5 6 7 8" for n, c in enumerate(truth, 1)]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return path


def write_devkit(root: Path) -> Path:
    """A devkit archive as torchvision's parser reads it: data/meta.mat (synsets; leaves have no children) and the
    validation ground truth, one ILSVRC2012_ID per line."""
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images")
    synsets = [(i + 1, wnid, f"class {i}, other name", "a gloss", 0, 0, 1300) for i, wnid in enumerate(WNIDS)]
    synsets.append((1001, "n00001740", "entity", "a parent", 3, 18, 0))
    scipy.io.savemat(data / "meta.mat", {"synsets": np.array(synsets, dtype=[(f, "O") for f in fields])})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{c}\n" for c in TRUTH))
    archive = root / "devkit.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    return archive


def tree(root: Path) -> dict[str, str]:
    """Relative path -> what it is (a link's target, or the file's size) for everything under root."""
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else str(p.stat().st_size)
            for p in sorted(root.rglob("*")) if not p.is_dir()}


def test_csv_labels_move_images_into_class_folders_and_a_second_run_changes_nothing(tmp_path: Path, capsys) -> None:
    val = flat_val(tmp_path / "val")
    labels = write_csv_labels(tmp_path / "LOC_val_solution.csv")
    assert prepare_imagenet.main(["--val", str(val), "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert "move: 7 images placed" in out and "0 already in place" in out and "every class holds" in out
    assert sorted(p.name for p in val.iterdir()) == WNIDS  # nothing left flat
    assert sorted(p.name for p in (val / WNIDS[2]).iterdir()) == [
        "ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000006.JPEG", "ILSVRC2012_val_00000007.JPEG"]
    before = tree(val)
    assert prepare_imagenet.main(["--val", str(val), "--labels", str(labels)]) == 0
    assert "move: 0 images placed" in capsys.readouterr().out and tree(val) == before
    # Sorted, the folder is what DATA.DATASET imagenet reads.
    (tmp_path / "train").symlink_to(val)
    config = load_config(str(write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "out",
                                          {"DATA": {"DATASET": "imagenet"}})))
    assert build_dataset(False, config).classes == WNIDS


@pytest.mark.parametrize("mode", ["symlink", "copy"])
def test_symlink_and_copy_leave_the_flat_files(tmp_path: Path, mode: str, capsys) -> None:
    val = flat_val(tmp_path / "val")
    original = tree(val)
    dst = tmp_path / "sorted"
    labels = write_csv_labels(tmp_path / "labels.csv")
    assert prepare_imagenet.main(["--val", str(val), "--labels", str(labels), "--mode", mode, "--dst", str(dst)]) == 0
    assert tree(val) == original
    placed = sorted(dst.rglob("*.JPEG"))
    assert len(placed) == 7 and all(p.is_symlink() == (mode == "symlink") for p in placed)
    assert all(p.read_bytes() == (val / p.name).read_bytes() for p in placed)
    assert prepare_imagenet.main(["--val", str(val), "--labels", str(labels), "--mode", mode, "--dst", str(dst)]) == 0
    assert f"{mode}: 0 images placed into {dst}/<wnid>/, 7 already in place" in capsys.readouterr().out


def test_devkit_labels_through_torchvisions_parser(tmp_path: Path, monkeypatch) -> None:
    val = flat_val(tmp_path / "val")
    archive = write_devkit(tmp_path / "devkit")
    with pytest.raises(RunError) as refused:
        prepare_imagenet.main(["--val", str(val), "--devkit", str(archive)])
    assert "is not the official ILSVRC2012_devkit_t12.tar.gz (its md5 differs)" in str(refused.value)
    # The fake archive passes once torchvision's md5 check (of the real archive) is bypassed; the parse is its own.
    monkeypatch.setattr(torchvision.datasets.imagenet, "_verify_archive", lambda *args: None)
    assert prepare_imagenet.main(["--val", str(val), "--devkit", str(archive), "--mode", "copy"]) == 0
    assert {wnid: len(list((val / wnid).iterdir())) for wnid in WNIDS} == {WNIDS[0]: 2, WNIDS[1]: 2, WNIDS[2]: 3}
    assert (val / WNIDS[0] / "ILSVRC2012_val_00000004.JPEG").is_file()


def test_nothing_is_overwritten_and_every_gap_is_reported(tmp_path: Path, capsys) -> None:
    val = flat_val(tmp_path / "val", count=6)  # image 7 is missing
    (val / "extra.jpg").write_bytes((val / "ILSVRC2012_val_00000001.JPEG").read_bytes())  # no label
    (val / WNIDS[0]).mkdir()
    (val / WNIDS[0] / "ILSVRC2012_val_00000004.JPEG").write_text("already here")  # in place: kept as it is
    (val / WNIDS[1]).mkdir()
    (val / WNIDS[1] / "ILSVRC2012_val_00000001.JPEG").write_text("in the wrong class")  # labelled WNIDS[0]
    labels = write_csv_labels(tmp_path / "labels.csv")
    assert prepare_imagenet.main(["--val", str(val), "--labels", str(labels)]) == 0
    captured = capsys.readouterr()
    assert "move: 4 images placed" in captured.out and "1 already in place" in captured.out
    assert (val / WNIDS[0] / "ILSVRC2012_val_00000004.JPEG").read_text() == "already here"
    assert (val / WNIDS[1] / "ILSVRC2012_val_00000001.JPEG").read_text() == "in the wrong class"
    assert (val / "ILSVRC2012_val_00000001.JPEG").is_file() and (val / "ILSVRC2012_val_00000004.JPEG").is_file()
    assert "1 images sit in another class folder" in captured.err
    assert f"ILSVRC2012_val_00000001.JPEG in {WNIDS[1]}/, labelled {WNIDS[0]}" in captured.err
    assert "1 labelled images are in neither" in captured.err and "ILSVRC2012_val_00000007" in captured.err
    assert "1 image files in" in captured.err and "extra.jpg" in captured.err
    assert f"{WNIDS[1]} 3/2" in captured.err and f"{WNIDS[2]} 2/3" in captured.err


def test_bad_input_is_refused_before_anything_moves(tmp_path: Path) -> None:
    val = flat_val(tmp_path / "val")
    (tmp_path / "bad.csv").write_text("id,label\n1,2\n")
    (tmp_path / "broken.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,cat 1 2 3 4\n")
    (tmp_path / "other.csv").write_text("ImageId,PredictionString\nsomething_else,n01440764 1 2 3 4\n")
    (tmp_path / "devkit.tar.gz").write_bytes(b"not an archive")
    cases = [
        (["--val", str(tmp_path / "none"), "--labels", str(tmp_path / "bad.csv")], "is not a folder"),
        (["--val", str(val), "--labels", str(tmp_path / "missing.csv")], "is not a file"),
        (["--val", str(val), "--labels", str(tmp_path / "bad.csv")], "expected the columns ImageId,PredictionString"),
        (["--val", str(val), "--labels", str(tmp_path / "broken.csv")], "broken.csv:2: expected an image id"),
        (["--val", str(val), "--labels", str(tmp_path / "other.csv")], "holds none of the 1 images"),
        (["--val", str(val), "--devkit", str(tmp_path / "devkit.tar.gz")], "(its md5 differs)"),
    ]
    for args, message in cases:
        with pytest.raises(RunError) as refused:
            prepare_imagenet.main(args)
        assert message in str(refused.value), args
    assert len(list(val.iterdir())) == 7  # untouched


def test_a_flat_imagenet_val_folder_names_this_tool(tmp_path: Path) -> None:
    flat_val(tmp_path / "val")
    (tmp_path / "train").mkdir()
    config = load_config(str(write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "out",
                                          {"DATA": {"DATASET": "imagenet"}})))
    with pytest.raises(DataError, match=r"holds 7 images directly .* python tools/prepare_imagenet.py --val "):
        build_dataset(False, config)
