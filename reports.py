"""Evaluation reports: per-class accuracy, the confusion matrix and every image's top-5 predictions.

Everything tallied here is a count (images of true class t predicted as p, images whose top-1 and top-5 are right),
so summing each rank's counts gives exactly what one process counts. Per-image predictions are gathered to
rank 0 and put back in dataset order by each sample's index. Only rank 0 writes the files.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from distributed import DistEnv, all_reduce_sum, gather_to_rank0

if TYPE_CHECKING:
    from data import SampleDataset

# Training logs the mean per-class accuracy of each epoch for fewer classes than this: on large, balanced
# validation sets such as ImageNet's (50 images per class) it says little beyond Acc@1.
PER_CLASS_MAX_CLASSES = 200
# Above this many classes a grid of the confusion matrix is unreadable; the picture shows the most-confused pairs.
GRID_MAX_CLASSES = 50
CONFUSED_PAIRS_SHOWN = 30
REPORT_TOPK = 5


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best classes of each row (at most as many as there are), best first, and their softmax
    probabilities: (B, k) each. Ranked on the logits as the accuracy is counted, so that a tool's top-1 is the
    class that ``engine.validate`` counts."""
    indices = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (B, k)
    return indices, logits.float().softmax(dim=1).gather(1, indices)


def topk_fields(k: int) -> list[str]:
    """Column names of a top-k prediction: class_1, prob_1, ..., class_k, prob_k."""
    return [field for rank in range(1, k + 1) for field in (f"class_{rank}", f"prob_{rank}")]


def topk_entries(classes: Sequence[str], indices: Sequence[int], probabilities: Sequence[float]
                 ) -> dict[str, str | float]:
    """One image's top-k as {class_1: name, prob_1: probability, ...}, probabilities rounded to 6 decimals."""
    entries: dict[str, str | float] = {}
    for rank, (index, probability) in enumerate(zip(indices, probabilities, strict=True), start=1):
        entries[f"class_{rank}"] = classes[index]
        entries[f"prob_{rank}"] = round(float(probability), 6)
    return entries


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    """Rows as CSV with a header; floats with 6 decimals (never in exponent form)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.6f}" if isinstance(value, float) else value for key, value in row.items()})


class ClassTally:
    """Per-class counts of an evaluation, and optionally each image's top-5 predictions.

    Args:
        num_classes: the classifier's outputs.
        device: where the counts accumulate (the model's device, so that no batch leaves it).
        keep_predictions: also keep (index, target, top-5 classes, probabilities) of every image.
    """

    def __init__(self, num_classes: int, device: torch.device, keep_predictions: bool = False) -> None:
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # [true, predicted]
        self.top1_hits = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.top5_hits = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.keep_predictions = keep_predictions
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.predictions: tuple[torch.Tensor, ...] | None = None  # (index, target, top-5, probabilities), rank 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
            correct: torch.Tensor | None = None) -> None:
        """Count a batch of readable images: logits (B, C), targets (B,), dataset indices (B,); ``correct`` (B, k)
        says whether each image's k best classes are right where more than the target is (ReaL's label sets, see
        ``data.Scoring``); by default, whether they are the target."""
        top, probabilities = top_k(logits, REPORT_TOPK)
        correct = top.eq(targets[:, None]) if correct is None else correct  # (B, k)
        self.confusion.index_put_((targets, top[:, 0]), torch.ones_like(targets), accumulate=True)
        self.top1_hits.index_add_(0, targets, correct[:, 0].long())
        self.top5_hits.index_add_(0, targets, correct.any(dim=1).long())
        if self.keep_predictions:
            self.batches.append((indices.cpu(), targets.cpu(), top.cpu(), probabilities.cpu()))

    def reduce(self, env: DistEnv) -> None:
        """Sum the counts over ranks (one all-reduce) and gather the predictions to rank 0 in dataset order; every
        rank calls it once, after its last batch."""
        classes = self.top5_hits.numel()
        counts = all_reduce_sum(torch.cat([self.confusion.flatten(), self.top1_hits, self.top5_hits]), env)
        self.confusion = counts[:-2 * classes].view(classes, classes)
        self.top1_hits, self.top5_hits = counts[-2 * classes:].view(2, classes)
        if not self.keep_predictions:
            return
        own = tuple(torch.cat(parts) for parts in zip(*self.batches, strict=True)) if self.batches else None
        gathered = [part for part in gather_to_rank0(own, env) or [] if part is not None]
        if gathered:
            columns = [torch.cat(parts) for parts in zip(*gathered, strict=True)]
            order = columns[0].argsort()
            self.predictions = tuple(column[order] for column in columns)

    def images(self) -> torch.Tensor:
        """Images per true class: (C,)."""
        return self.confusion.sum(dim=1)

    def mean_class_accuracy(self) -> float:
        """The mean over classes (those with validation images) of each class's top-1 accuracy, in %."""
        images = self.images()
        seen = images > 0
        return 100.0 * (self.top1_hits[seen].double() / images[seen]).mean().item()


def sample_names(dataset: SampleDataset) -> list[str]:
    """What names each sample in the reports: its file for image folders, ``#index`` for in-memory sets (CIFAR)."""
    samples = getattr(dataset.base, "samples", None)
    if samples is not None:
        return [path for path, _ in samples]
    return [f"#{index}" for index in range(len(dataset))]


def write_reports(folder: Path, tally: ClassTally, classes: Sequence[str], names: Sequence[str],
                  logger: logging.Logger) -> list[Path]:
    """Write per_class.csv, predictions.csv (when kept), confusion_matrix.csv and confusion_matrix.png (when
    matplotlib is installed) into ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    confusion = tally.confusion.cpu().numpy()
    images = confusion.sum(axis=1)
    top1 = tally.top1_hits.cpu().numpy()
    top5 = tally.top5_hits.cpu().numpy()
    per_class = [{"class": name, "images": int(n),
                  "top-1": f"{100 * hit / n:.3f}" if n else "", "top-5": f"{100 * hit5 / n:.3f}" if n else ""}
                 for name, n, hit, hit5 in zip(classes, images, top1, top5, strict=True)]
    written = [folder / "per_class.csv"]
    write_csv(written[-1], ["class", "images", "top-1", "top-5"], per_class)

    if tally.predictions is not None:
        indices, targets, top, probabilities = (column.tolist() for column in tally.predictions)
        rows = [{"path": names[index], "label": classes[target], **topk_entries(classes, best, chances)}
                for index, target, best, chances in zip(indices, targets, top, probabilities, strict=True)]
        written.append(folder / "predictions.csv")
        write_csv(written[-1], ["path", "label", *topk_fields(len(top[0]) if top else 0)], rows)

    written.append(folder / "confusion_matrix.csv")
    with open(written[-1], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([name, *row.tolist()] for name, row in zip(classes, confusion, strict=True))

    try:
        plot_confusion(confusion, classes, folder / "confusion_matrix.png", tally.mean_class_accuracy())
        written.append(folder / "confusion_matrix.png")
    except ImportError:
        logger.warning("confusion_matrix.png needs matplotlib, which is not installed (pip install matplotlib); "
                       "the CSV files are written")
    return written


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: Path, mean_accuracy: float) -> None:
    """A row-normalised confusion matrix (each true class's images sum to 100%); for more than GRID_MAX_CLASSES
    classes, a bar chart of the most-confused pairs instead, since such a grid cannot be read.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    images = confusion.sum(axis=1, keepdims=True)
    rates = 100.0 * confusion / np.maximum(images, 1)  # (C, C), % of each true class
    title = f"{int(images.sum())} images, {len(classes)} classes, mean per-class accuracy {mean_accuracy:.2f}%"
    if len(classes) <= GRID_MAX_CLASSES:
        side = max(4.5, 0.32 * len(classes) + 2.5)
        fig, ax = plt.subplots(figsize=(side + 1, side))
        shown = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set(xlabel="predicted class", ylabel="true class")
        if len(classes) <= 20:
            for (true, predicted), rate in np.ndenumerate(rates):
                if confusion[true, predicted]:
                    ax.text(predicted, true, f"{rate:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if rate > 50 else "black")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    else:
        off_diagonal = confusion.copy()
        np.fill_diagonal(off_diagonal, 0)
        # Highest share of the true class first (the rows are normalised), then most images.
        order = np.lexsort((-off_diagonal.ravel(), -np.where(off_diagonal > 0, rates, 0).ravel()))
        pairs = [divmod(int(flat), len(classes)) for flat in order[:CONFUSED_PAIRS_SHOWN] if off_diagonal.flat[flat]]
        fig, ax = plt.subplots(figsize=(9, 0.3 * max(len(pairs), 1) + 1.5))
        ax.barh(range(len(pairs)), [rates[t, p] for t, p in pairs], color="tab:blue")
        ax.set_yticks(range(len(pairs)), [f"{classes[t]} -> {classes[p]}" for t, p in pairs], fontsize=8)
        for row, (t, p) in enumerate(pairs):
            ax.text(rates[t, p], row, f" {confusion[t, p]}", va="center", fontsize=7)
        ax.invert_yaxis()  # the most confused pair on top
        ax.set(xlabel="% of the true class's images predicted as the other class")
        title = f"the {len(pairs)} most-confused pairs (true -> predicted, image counts)\n{title}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
