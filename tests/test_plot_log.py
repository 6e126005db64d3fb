"""tools/plot_log.py: reading a run's JSON rows and its optional matplotlib dependency."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import plot_log  # noqa: E402  (tools/ is a folder of scripts, not a package)

from utils import RunError  # noqa: E402


def write_rows(path: Path, epochs: list[int]) -> Path:
    rows = [{"epoch": e, "train_loss": 2.0 - e / 10, "val_loss": 1.5, "acc1": 10.0 * e, "acc5": 50.0, "lr": 1e-3}
            for e in epochs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_rows_of_a_resumed_run_keep_the_last_row_per_epoch(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "metrics.jsonl", [0, 1, 2, 1, 2, 3])  # killed after epoch 2, resumed from 0
    assert [row["epoch"] for row in plot_log.read_rows(path)] == [0, 1, 2, 3]


def test_bad_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(RunError, match="bad.jsonl:1 is not a JSON row"):
        plot_log.main([str(tmp_path / "bad.jsonl")])
    with pytest.raises(RunError, match="missing.jsonl not found"):
        plot_log.main([str(tmp_path / "missing.jsonl")])


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(RunError, match="plotting needs matplotlib"):
        plot_log.main([str(write_rows(tmp_path / "metrics.jsonl", [0, 1]))])


def test_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = write_rows(tmp_path / "metrics.jsonl", [0, 1, 2])
    assert plot_log.main([str(path)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
