"""tools/split_caltech101.py on a fake 101_ObjectCategories tree."""

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import split_caltech101  # noqa: E402  (tools/ is a folder of scripts, not a package)
from split_caltech101 import SplitError  # noqa: E402

COUNTS = {"accordion": 10, "airplanes": 7, "anchor": 3, "BACKGROUND_Google": 5, "Faces": 2}


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under root (links followed)."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_split_counts_no_overlap_nothing_lost_background_out(caltech_source: Callable, tmp_path: Path) -> None:
    src = caltech_source(COUNTS)
    before = _tree(src)
    dst = tmp_path / "split"
    assert split_caltech101.main(["--src", str(src), "--dst", str(dst)]) == 0
    for name, count in COUNTS.items():
        if name == "BACKGROUND_Google":
            assert not (dst / "train" / name).exists() and not (dst / "val" / name).exists()
            continue
        train = {p.name for p in (dst / "train" / name).iterdir()}
        val = {p.name for p in (dst / "val" / name).iterdir()}
        assert len(train) == int(count * 0.8) and len(val) == count - int(count * 0.8)
        assert not train & val
        assert train | val == {p.name for p in (src / name).iterdir()}
    assert _tree(src) == before  # the source is only read
    manifest = json.loads((dst / split_caltech101.MANIFEST).read_text())
    assert set(manifest["classes"]) == set(COUNTS) - {"BACKGROUND_Google"}


def test_split_is_reproducible_and_seeded(caltech_source: Callable, tmp_path: Path) -> None:
    src = caltech_source(COUNTS)
    runs = {}
    for name, seed in (("a", "1024"), ("b", "1024"), ("c", "7")):
        split_caltech101.main(["--src", str(src), "--dst", str(tmp_path / name), "--seed", seed])
        runs[name] = json.loads((tmp_path / name / split_caltech101.MANIFEST).read_text())["classes"]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_background_included_on_request_without_changing_other_classes(caltech_source: Callable,
                                                                        tmp_path: Path) -> None:
    src = caltech_source(COUNTS)
    split_caltech101.main(["--src", str(src), "--dst", str(tmp_path / "a")])
    split_caltech101.main(["--src", str(src), "--dst", str(tmp_path / "b"), "--include-background"])
    without = json.loads((tmp_path / "a" / split_caltech101.MANIFEST).read_text())["classes"]
    with_bg = json.loads((tmp_path / "b" / split_caltech101.MANIFEST).read_text())["classes"]
    assert len(with_bg["BACKGROUND_Google"]["train"]) == 4
    assert {k: v for k, v in with_bg.items() if k != "BACKGROUND_Google"} == without


@pytest.mark.parametrize("mode", ["symlink", "hardlink"])
def test_link_modes_point_at_the_source(caltech_source: Callable, tmp_path: Path, mode: str) -> None:
    src = caltech_source({"a": 5, "b": 5})
    dst = tmp_path / "split"
    assert split_caltech101.main(["--src", str(src), "--dst", str(dst), "--mode", mode]) == 0
    placed = next((dst / "train" / "a").iterdir())
    original = src / "a" / placed.name
    if mode == "symlink":
        assert placed.is_symlink() and placed.resolve() == original.resolve()
    else:
        assert os.path.samefile(placed, original)


def test_non_empty_destination_is_refused_and_left_alone(caltech_source: Callable, tmp_path: Path) -> None:
    src = caltech_source({"a": 4})
    dst = tmp_path / "split"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(SplitError, match="is not empty"):
        split_caltech101.main(["--src", str(src), "--dst", str(dst)])
    with pytest.raises(SplitError, match="only replaces this tool's output"):
        split_caltech101.main(["--src", str(src), "--dst", str(dst), "--force"])
    assert [p.name for p in dst.iterdir()] == ["notes.txt"] and (dst / "notes.txt").read_text() == "mine"


def test_force_replaces_only_what_the_manifest_lists(caltech_source: Callable, tmp_path: Path, capsys) -> None:
    src = caltech_source({"a": 10, "b": 6})
    dst = tmp_path / "split"
    assert split_caltech101.main(["--src", str(src), "--dst", str(dst)]) == 0
    (dst / "train" / "a" / "user_added.txt").write_text("keep")
    (dst / "README.txt").write_text("keep")
    with pytest.raises(SplitError, match="is not empty"):  # without --force
        split_caltech101.main(["--src", str(src), "--dst", str(dst), "--seed", "3"])
    capsys.readouterr()
    assert split_caltech101.main(["--src", str(src), "--dst", str(dst), "--seed", "3", "--force"]) == 0
    out = capsys.readouterr().out
    assert "train: 12 images in 2 classes" in out and "val: 4 images in 2 classes" in out
    assert (dst / "train" / "a" / "user_added.txt").read_text() == "keep" and (dst / "README.txt").exists()
    manifest = json.loads((dst / split_caltech101.MANIFEST).read_text())["classes"]
    for name, splits in manifest.items():
        for split, files in splits.items():
            on_disk = {p.name for p in (dst / split / name).iterdir()} - {"user_added.txt"}
            assert on_disk == set(files)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-ratio", "1.0"], "--train-ratio must be between 0 and 1"),
        (["--train-ratio", "0"], "--train-ratio must be between 0 and 1"),
        (["--src", "MISSING"], "is not a folder"),
        (["--src", "EMPTY_CLASS"], "holds no files"),
        (["--src", "NO_CLASSES"], "holds no class folders"),
        (["--train-ratio", "0.2"], "has 3 files, too few to give both splits one"),
    ],
)
def test_bad_input_is_refused_before_any_output(caltech_source: Callable, tmp_path: Path, args: list[str],
                                               message: str) -> None:
    src = caltech_source({"a": 3})
    (tmp_path / "EMPTY_CLASS" / "a").mkdir(parents=True)
    (tmp_path / "NO_CLASSES").mkdir()
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    full = ["--src", str(src), "--dst", str(tmp_path / "out"), *args]
    with pytest.raises(SplitError, match=message):
        split_caltech101.main(full)
    assert not (tmp_path / "out").exists()


def test_a_destination_reaching_the_source_through_a_link_is_refused(caltech_source: Callable, tmp_path: Path
                                                                     ) -> None:
    src = caltech_source({"a": 3, "b": 3})
    link = tmp_path / "link"
    link.symlink_to(src)
    for dst, real in ((link / "split", src / "split"), (link, src)):
        with pytest.raises(SplitError) as refused:
            split_caltech101.main(["--src", str(src), "--dst", str(dst)])
        assert str(refused.value) == (f"destination {dst} lies inside the source {src} (it is {real}); "
                                      "choose a folder outside it")
    assert sorted(p.name for p in src.iterdir()) == ["a", "b"]
