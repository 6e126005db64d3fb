"""logger: the console and error streams of each rank, and MetricsLog's JSON rows mirrored to TensorBoard."""

import io
import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from logger import MetricsLog, close_logger, create_logger


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


def test_non_finite_numbers_are_written_as_null_so_every_line_is_json(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True)
    log.write({"epoch": 0, "train_loss": float("nan"), "ema_acc1": float("inf"), "acc1": 10.0})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(line, parse_constant=refuse) == {"epoch": 0, "train_loss": None, "ema_acc1": None, "acc1": 10.0}


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=False)
    log.write({"epoch": 0, "acc1": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_every_rank_reports_its_errors_on_stderr_and_only_rank0_prints_progress(tmp_path: Path) -> None:
    streams = {rank: (io.StringIO(), io.StringIO()) for rank in (0, 3)}
    for rank, (console, errors) in streams.items():
        logger = create_logger(tmp_path, rank, "run", console=console, errors=errors)
        logger.info("progress")
        logger.error("loss is nan")
        close_logger(logger)
    for rank, (console, errors) in streams.items():
        assert f"run rank {rank}]" in errors.getvalue() and "loss is nan" in errors.getvalue()
        assert "progress" not in errors.getvalue() and "loss is nan" not in console.getvalue()
        assert "loss is nan" in (tmp_path / f"log_rank{rank}.txt").read_text()
    assert "progress" in streams[0][0].getvalue() and streams[3][0].getvalue() == ""
