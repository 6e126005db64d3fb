"""tools/predict.py on a trained tiny model: what it predicts equals what --eval counts; bad input is reported."""

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyRun
from run_helpers import write_config
from timm.data import ImageNetInfo

import main
from checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint
from config import ConfigError
from utils import RunError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import predict  # noqa: E402  (tools/ is a folder of scripts, not a package)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_predictions_equal_what_eval_counts(tiny_run: TinyRun, tmp_path: Path, capsys) -> None:
    val = tiny_run.images / "val"
    assert predict.main(["--checkpoint", str(tiny_run.checkpoint), str(val), "--batch-size", "4",
                         "--output", str(tmp_path / "predictions.csv")]) == 0
    out = capsys.readouterr().out
    predicted = {row["path"]: row for row in read_csv(tmp_path / "predictions.csv")}
    assert len(predicted) == 15 and not any(row["error"] for row in predicted.values())
    assert f"{val / 'class_1' / '3.png'}: class_" in out and "predicted 15 images" in out

    # The evaluation of the same images (other batches: 4 here), with its per-image report.
    assert main.main(["--cfg", str(tiny_run.run / "config.yaml"), "--eval", "--resume", str(tiny_run.checkpoint),
                      "--output", str(tmp_path / "eval"), "--tag", "eval"]) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if " * Acc@1 " in line][-1]
    evaluated = read_csv(next((tmp_path / "eval").rglob("predictions.csv")))
    assert sorted(predicted) == sorted(row["path"] for row in evaluated)
    for row in evaluated:
        assert {k: v for k, v in row.items() if k != "label"} == {
            k: v for k, v in predicted[row["path"]].items() if k != "error"}
    correct = sum(row["class_1"] == Path(path).parent.name for path, row in predicted.items())
    assert summary.split(" * ")[1].startswith(f"Acc@1 {100 * correct / 15:.3f} ")


def test_unreadable_files_are_reported_and_the_others_predicted(tiny_run: TinyRun, tmp_path: Path,
                                                                capsys) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_run.images / "val" / "class_2", folder / "sub")
    (folder / "truncated.png").write_bytes((folder / "sub" / "0.png").read_bytes()[:60])
    (folder / "notes.jpg").write_text("not an image")
    args = ["--checkpoint", str(tiny_run.checkpoint), "--topk", "2", "--output", str(tmp_path / "out.json")]
    assert predict.main([*args, str(folder), str(tmp_path / "missing"), str(folder / "sub" / "1.png")]) == 0
    err = capsys.readouterr().err
    assert f"cannot read {folder / 'truncated.png'}: " in err and f"cannot read {folder / 'notes.jpg'}: " in err
    assert f"{tmp_path / 'missing'}: no such file or folder" in err
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [row["path"] for row in rows] == [str(folder / "notes.jpg"), *(str(folder / "sub" / f"{i}.png")
                                                                       for i in range(5)),
                                             str(folder / "truncated.png"), str(tmp_path / "missing")]
    assert set(rows[0]) == {"path", "class_1", "prob_1", "class_2", "prob_2", "error"}
    assert rows[0]["error"].startswith("UnidentifiedImageError") and rows[0]["class_1"] is None
    assert all(row["error"] == "" and row["class_1"] == "class_2" and 0 < row["prob_2"] < row["prob_1"] <= 1
               for row in rows[1:6])
    assert rows[7]["error"].startswith("no such file or folder")


def test_nothing_predictable_or_bad_arguments_are_refused(tiny_run: TinyRun, tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("not an image")
    checkpoint = ["--checkpoint", str(tiny_run.checkpoint)]
    cases = [
        ([*checkpoint, str(tmp_path / "bad.png")], RunError, "none of the 1 files could be read as an image"),
        ([*checkpoint, str(tmp_path / "nothing*.png")], RunError, "no image files found in"),
        ([*checkpoint, str(tmp_path), "--output", str(tmp_path / "out.txt")], RunError,
         "expected a file name ending in .csv"),
        (["--checkpoint", str(tmp_path / "bad.png"), str(tmp_path)], CheckpointError, "truncated or corrupt"),
        ([*checkpoint, str(tmp_path), "--opts", "DATA.IMG_SIZE", "30"], ConfigError,
         "DATA.IMG_SIZE must be one side or [height, width], positive integers divisible by 32"),
    ]
    for args, error, message in cases:
        with pytest.raises(error) as refused:
            predict.main(args)
        assert message in str(refused.value), args


def test_an_output_that_cannot_be_written_stops_before_predicting(tiny_run: TinyRun, tmp_path: Path,
                                                                  capsys) -> None:
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    images = str(tiny_run.images / "val")
    with pytest.raises(RunError) as refused:
        predict.main(["--checkpoint", str(tiny_run.checkpoint), images, "--output", str(in_the_way / "p.csv")])
    assert str(refused.value) == f"--output {in_the_way}: {in_the_way} is a file, not a folder; give another path"
    assert capsys.readouterr().out == ""  # nothing was predicted first
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(RunError) as refused:
        predict.main(["--checkpoint", str(tiny_run.checkpoint), images, "--output", str(tmp_path / "folder.csv")])
    assert str(refused.value) == f"--output {tmp_path / 'folder.csv'} is a folder; give a file name ending in .csv " \
                                 "or .json"


def test_release_checkpoints_need_cfg_and_get_imagenet_names(tiny_run: TinyRun, tmp_path: Path) -> None:
    """A release checkpoint holds weights only: the model comes from --cfg, and 1000 outputs get ImageNet's names."""
    weights = load_checkpoint_file(tiny_run.checkpoint)["model"]
    head = torch.nn.Linear(weights["head.weight"].shape[1], 1000)
    weights.update({"head.weight": head.weight.detach(), "head.bias": head.bias.detach()})
    save_checkpoint({"model": weights, "epoch": 299}, tmp_path / "release.pth")
    image = str(tiny_run.images / "val" / "class_0" / "0.png")
    with pytest.raises(CheckpointError, match="carries no config of this repository"):
        predict.main(["--checkpoint", str(tmp_path / "release.pth"), image])
    cfg = write_config(tmp_path / "release.yaml", tiny_run.images, tmp_path / "out", {"MODEL": {"NUM_CLASSES": 1000}})
    assert predict.main(["--checkpoint", str(tmp_path / "release.pth"), "--cfg", str(cfg), image,
                         "--output", str(tmp_path / "out.csv")]) == 0
    names = {description.split(",")[0] for description in ImageNetInfo().label_descriptions()}
    row = read_csv(tmp_path / "out.csv")[0]
    assert {row[f"class_{rank}"] for rank in range(1, 6)} <= names


@pytest.mark.parametrize("flag", ["--topk", "--batch-size"])
def test_counts_below_one_are_refused(tiny_run: TinyRun, flag: str) -> None:
    with pytest.raises(RunError, match="must be 1 or more"):
        predict.main(["--checkpoint", str(tiny_run.checkpoint), flag, "0", str(tiny_run.images)])
