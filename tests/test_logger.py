"""logger.MetricsLog: JSON rows per epoch, mirrored to TensorBoard events, written by rank 0 only."""

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from logger import MetricsLog


def test_rows_go_to_json_lines_and_tensorboard(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True)
    log.write({"epoch": 0, "train_loss": 2.5, "acc1": 10.0})
    log.write({"epoch": 1, "train_loss": 1.5, "acc1": 42.0})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 0, "train_loss": 2.5, "acc1": 10.0}, {"epoch": 1, "train_loss": 1.5, "acc1": 42.0}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("acc1")] == [(0, 10.0), (1, 42.0)]


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=False)
    log.write({"epoch": 0, "acc1": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []
