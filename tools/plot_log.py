"""Plot a run's per-epoch rows (``metrics.jsonl``) as a PNG of loss, accuracy and learning-rate curves.

    python tools/plot_log.py output/strip_mlp_demo/default/metrics.jsonl [--out curves.png]

matplotlib is optional for the project; without it this tool stops with a one-line message.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import run_tool  # puts the checkout on the path for the imports below

from utils import RunError


def read_rows(path: Path) -> list[dict]:
    """The JSON rows of ``path``; a resumed run appends rows again, so the last row of each epoch wins."""
    by_epoch = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RunError(f"{path}:{number} is not a JSON row; give the metrics.jsonl of a run") from None
        by_epoch[row["epoch"]] = row
    if not by_epoch:
        raise RunError(f"{path} holds no rows yet; it gains one per finished epoch")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def plot(rows: list[dict], out: Path) -> None:
    """Three panels side by side: train/val loss, top-1/top-5 accuracy (and EMA top-1), learning rate."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in rows], label="val")
    loss_ax.set(title="loss", xlabel="epoch")
    for key, label in (("acc1", "top-1"), ("acc5", "top-5"), ("ema_acc1", "EMA top-1")):
        if key in rows[0]:
            acc_ax.plot(epochs, [r[key] for r in rows], label=label)
    acc_ax.set(title="validation accuracy (%)", xlabel="epoch")
    lr_ax.plot(epochs, [r["lr"] for r in rows])
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in (loss_ax, acc_ax):
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    parser.add_argument("--out", type=Path, help="PNG to write (default: curves.png beside the metrics)")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        raise RunError(f"{args.metrics} not found; give the metrics.jsonl in a run's output folder")
    rows = read_rows(args.metrics)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RunError("plotting needs matplotlib, which is not installed; pip install matplotlib") from None
    out = args.out or args.metrics.with_name("curves.png")
    plot(rows, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
