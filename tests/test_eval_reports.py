"""Evaluation reports: per-class counts, the confusion matrix and per-image predictions, exact across ranks."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyRun
from run_helpers import launch, write_image_folder

import main
from distributed import DistEnv
from reports import GRID_MAX_CLASSES, ClassTally, plot_confusion, write_reports

SINGLE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def logits_for(predicted: list[list[int]], classes: int) -> torch.Tensor:
    """Logits whose ranking of each row is ``predicted[row]`` (best first), the other classes below."""
    logits = torch.zeros(len(predicted), classes)
    for row, ranking in enumerate(predicted):
        for place, index in enumerate(ranking):
            logits[row, index] = 10.0 - place
    return logits


def test_tally_counts_classes_and_puts_predictions_in_dataset_order() -> None:
    tally = ClassTally(7, torch.device("cpu"), keep_predictions=True)
    # Class 0: two images, one right; class 1: one image, wrong but in its top 5; class 2: right; 3..6: no images.
    tally.add(logits_for([[1, 0], [2]], 7), torch.tensor([0, 2]), torch.tensor([3, 1]))
    tally.add(logits_for([[0], [0, 2, 3, 4, 5, 1]], 7), torch.tensor([0, 1]), torch.tensor([0, 2]))
    tally.reduce(SINGLE)
    assert tally.confusion[:3, :3].tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert tally.top5_hits.tolist() == [2, 0, 1, 0, 0, 0, 0]  # class 1 is 6th in its row
    assert tally.mean_class_accuracy() == pytest.approx(100 * (1 / 2 + 0 + 1) / 3)  # classes without images left out
    indices, targets, top, probabilities = tally.predictions
    assert indices.tolist() == [0, 1, 2, 3] and targets.tolist() == [0, 2, 1, 0]
    assert top[:, 0].tolist() == [0, 2, 0, 1] and top.shape == (4, 5)
    assert torch.all(probabilities[:, :-1] >= probabilities[:, 1:])


def test_eval_writes_per_class_predictions_and_confusion_reports(tiny_run: TinyRun, tmp_path: Path, capsys) -> None:
    assert main.main(["--cfg", str(tiny_run.run / "config.yaml"), "--eval", "--resume", str(tiny_run.checkpoint),
                      "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    folder = next(tmp_path.rglob("eval"))
    assert {p.name for p in folder.iterdir()} == {"per_class.csv", "predictions.csv", "confusion_matrix.csv",
                                                  "confusion_matrix.png", "config.yaml", "log_rank0.txt"}
    per_class = read_csv(folder / "per_class.csv")
    assert per_class[0] == ["class", "images", "top-1", "top-5"]
    assert [row[:2] for row in per_class[1:]] == [["class_0", "5"], ["class_1", "5"], ["class_2", "5"]]
    confusion = read_csv(folder / "confusion_matrix.csv")
    assert confusion[0] == ["true \\ predicted", "class_0", "class_1", "class_2"]
    counts = np.array([[int(n) for n in row[1:]] for row in confusion[1:]])
    assert [row[0] for row in confusion[1:]] == ["class_0", "class_1", "class_2"]
    assert counts.sum(axis=1).tolist() == [5, 5, 5]
    for row, diagonal in zip(per_class[1:], counts.diagonal(), strict=True):
        assert float(row[2]) == pytest.approx(100 * diagonal / 5)
    mean = np.mean(counts.diagonal() / 5) * 100
    assert f" * mean per-class Acc@1 {mean:.3f}" in out
    assert f" * Acc@1 {100 * counts.diagonal().sum() / 15:.3f} " in out
    predictions = read_csv(folder / "predictions.csv")
    assert predictions[0] == ["path", "label", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert [Path(row[0]).parent.name for row in predictions[1:]] == [row[1] for row in predictions[1:]]
    assert sorted(row[0] for row in predictions[1:]) == sorted(str(p) for p in (tiny_run.images / "val").rglob("*.png"))
    top1 = [[row[1], row[2]] for row in predictions[1:]]
    assert sum(true == guess for true, guess in top1) == counts.diagonal().sum()


def val_with_one_unreadable_image(root: Path) -> tuple[Path, Path]:
    """35 validation images per class, one of class_1 truncated: under the 1% that stops a run."""
    data = write_image_folder(root, train_per_class=1, val_per_class=35)
    broken = data / "val" / "class_1" / "2.png"
    broken.write_bytes(broken.read_bytes()[:50])
    return data, broken


def test_unreadable_images_are_left_out_of_every_report(tiny_run: TinyRun, tmp_path: Path) -> None:
    data, broken = val_with_one_unreadable_image(tmp_path / "data")
    assert main.main(["--cfg", str(tiny_run.run / "config.yaml"), "--eval", "--resume", str(tiny_run.checkpoint),
                      "--data-path", str(data), "--output", str(tmp_path / "out")]) == 0
    folder = next((tmp_path / "out").rglob("eval"))
    assert [row[1] for row in read_csv(folder / "per_class.csv")[1:]] == ["35", "34", "35"]
    paths = [row[0] for row in read_csv(folder / "predictions.csv")[1:]]
    assert len(paths) == 104 and str(broken) not in paths
    assert sum(int(n) for row in read_csv(folder / "confusion_matrix.csv")[1:] for n in row[1:]) == 104


def test_many_classes_show_the_most_confused_pairs(tmp_path: Path) -> None:
    classes = [f"c{i}" for i in range(GRID_MAX_CLASSES + 10)]
    tally = ClassTally(len(classes), torch.device("cpu"), keep_predictions=True)
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(len(classes)).repeat(3)
    logits = torch.randn(len(targets), len(classes), generator=generator)
    logits[torch.arange(len(targets)), targets] += 1.5
    tally.add(logits, targets, torch.arange(len(targets)))
    tally.reduce(SINGLE)
    written = write_reports(tmp_path, tally, classes, [f"img{i}" for i in range(len(targets))], logging.getLogger())
    assert [p.name for p in written] == ["per_class.csv", "predictions.csv", "confusion_matrix.csv",
                                         "confusion_matrix.png"]
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 10_000
    plot_confusion(np.diag([4, 5]), ["a", "b"], tmp_path / "small.png", 100.0)
    assert (tmp_path / "small.png").read_bytes()[:4] == b"\x89PNG"


def test_training_logs_the_mean_per_class_accuracy(tiny_run: TinyRun) -> None:
    rows = [json.loads(line) for line in (tiny_run.run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row["mean_class_acc"] <= 100 for row in rows)


@pytest.mark.slow
def test_two_processes_write_the_files_one_process_writes(tiny_run: TinyRun, tmp_path: Path) -> None:
    """Uneven, strided shards (53 and 52 images) and an unreadable image: the same files, byte for byte."""
    data, _ = val_with_one_unreadable_image(tmp_path / "data")
    args = ["--cfg", str(tiny_run.run / "config.yaml"), "--eval", "--resume", str(tiny_run.checkpoint),
            "--data-path", str(data)]
    for nproc, name in ((2, "two"), (0, "one")):
        result = launch([*args, "--output", str(tmp_path / name)], nproc=nproc)
        assert result.returncode == 0, result.stdout + result.stderr
    two, one = next((tmp_path / "two").rglob("eval")), next((tmp_path / "one").rglob("eval"))

    def reports(folder: Path) -> list[Path]:  # the folder also holds the evaluation's config and per-rank logs
        return sorted(p for p in folder.iterdir() if p.suffix in (".csv", ".png"))

    assert [p.name for p in reports(two)] == [p.name for p in reports(one)] != []
    for path in reports(one):
        if path.name != "predictions.csv":  # counts: exact
            assert (two / path.name).read_bytes() == path.read_bytes(), path.name
    # Probabilities may differ in the last printed digit: CPU kernels (oneDNN with AVX-512) round differently for
    # the batch sizes of the two shards. Every other field is exact.
    rows_one, rows_two = read_csv(one / "predictions.csv"), read_csv(two / "predictions.csv")
    assert [row[0::2] for row in rows_two] == [row[0::2] for row in rows_one]  # path, classes
    assert [row[1] for row in rows_two] == [row[1] for row in rows_one]  # label
    probabilities = [[float(p) for p in row[3::2]] for row in rows_one[1:]]
    assert np.allclose([[float(p) for p in row[3::2]] for row in rows_two[1:]], probabilities, rtol=0, atol=2e-6)
    assert len(read_csv(one / "predictions.csv")) == 1 + 104
