"""Logging of a run: a coloured console on rank 0, errors of every rank on stderr, a file per rank, and one JSON
row per epoch.

Loggers are built as plain ``logging.Logger`` objects (not taken from the global registry) and passed
around explicitly, so two runs in one process (the tests) never share handlers.
"""

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from termcolor import colored

FILE_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _ColourFormatter(logging.Formatter):
    """Green time and name (and the rank, when given), and the level in red/yellow for warnings and errors."""

    def __init__(self, where: str = "") -> None:
        super().__init__()
        self.where = f" {where}" if where else ""

    def format(self, record: logging.LogRecord) -> str:
        head = colored(f"[{self.formatTime(record, DATE_FORMAT)} {record.name}{self.where}]", "green")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"{head} {colored(record.levelname, 'red')} {message}"
        if record.levelno >= logging.WARNING:
            return f"{head} {colored(record.levelname, 'yellow')} {message}"
        return f"{head} {message}"


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def create_logger(output_dir: Path, rank: int, name: str, console: TextIO | None = None,
                  errors: TextIO | None = None) -> logging.Logger:
    """A logger writing to ``output_dir/log_rank<rank>.txt``, on rank 0 to the console, and errors to stderr.

    Args:
        output_dir: The run's output folder (created if needed).
        rank: The process's rank; only rank 0 prints progress so that N processes do not print N copies, but
            every rank prints its errors, marked with its rank, so a failure on any rank is seen.
        name: Shown in every line (the model name).
        console: The console stream for progress (stdout by default).
        errors: The stream for errors (stderr by default).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.Logger(name, level=logging.DEBUG)
    if rank == 0:
        handler = logging.StreamHandler(console or sys.stdout)
        handler.setLevel(logging.INFO)
        handler.addFilter(_below_error)
        handler.setFormatter(_ColourFormatter())
        logger.addHandler(handler)
    error_handler = logging.StreamHandler(errors or sys.stderr)
    error_handler.setLevel(logging.ERROR)
    error_handler.setFormatter(_ColourFormatter(f"rank {rank}"))
    logger.addHandler(error_handler)
    file_handler = logging.FileHandler(output_dir / f"log_rank{rank}.txt", mode="a")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT, datefmt=DATE_FORMAT))
    logger.addHandler(file_handler)
    return logger


def close_logger(logger: logging.Logger) -> None:
    """Flush and detach every handler (files closed) so that the output folder can be reused in-process."""
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


class ProgressLine:
    """A live, self-overwriting status line, shown only when the stream is a terminal (never in log files)."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()

    def update(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r" + text[:150].ljust(150))
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 150 + "\r")
            self.stream.flush()


METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file in the order written ([] when there is none); a line cut short by a kill
    is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


class MetricsLog:
    """One JSON row per epoch in ``metrics.jsonl``, mirrored to TensorBoard when it is installed.

    Only rank 0 keeps this log; other ranks get a disabled instance so callers need no rank checks.
    """

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.path = output_dir / METRICS_FILE
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; the JSON rows hold the same numbers
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def reconcile(self, rows: list[dict[str, Any]] | None, last_epoch: int) -> list[dict[str, Any]]:
        """Make the file hold exactly one row per finished epoch, up to ``last_epoch`` (where the run resumes);
        returns those rows.

        ``rows`` are those the resumed checkpoint carries (it is written before the file's row, so a kill between
        the two loses nothing). None (a checkpoint from before rows were saved): the file's own rows, the last of
        each epoch. Rows past ``last_epoch`` (a rewound run, or an epoch whose checkpoint was never written) go.
        """
        if rows is None:
            by_epoch = {row["epoch"]: row for row in (read_metrics(self.path) if self.enabled else [])}
            rows = [by_epoch[epoch] for epoch in sorted(by_epoch)]
        rows = [row for row in rows if row["epoch"] <= last_epoch]
        if self.enabled and (rows or self.path.exists()):
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
            os.replace(tmp, self.path)
        return rows

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # JSON has no NaN or infinity (a diverged loss): they are written as null, so every line stays valid JSON.
        finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(finite, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
