"""One timeline per output folder: a run continues from the checkpoint written last, a requeued `--resume FILE` run
continues what it wrote, pruning spares what a run did not write, and metrics.jsonl keeps one row per epoch."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from run_helpers import REPO, launch, plain, run_dir, write_config, write_image_folder
from yacs.config import CfgNode

from checkpoint import (
    CheckpointError,
    Resume,
    choose_resume,
    load_checkpoint_file,
    peek_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    start_timeline,
)
from config import default_config
from distributed import DistEnv
from logger import MetricsLog

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOGGER = logging.Logger("timeline")


def config_for(folder: Path, resume: Path | None = None) -> CfgNode:
    config = default_config()
    config.merge_from_list(["OUTPUT", str(folder), "MODEL.RESUME", str(resume or "")])
    return config


def run_checkpoint(epoch: int, step: int = 0) -> dict:
    return {"epoch": epoch, "step": step, "model": {"w": torch.full((2,), float(epoch))}, "optimizer": {}}


def save(timeline, folder: Path, epoch: int, files: tuple[str, ...] = ("epoch", "latest")) -> None:
    """Write epoch ``epoch``'s files as save_epoch does: the epoch file, then latest.pth."""
    for kind in files:
        path = folder / (f"ckpt_epoch_{epoch}.pth" if kind == "epoch" else "latest.pth")
        save_checkpoint(timeline.stamp(path, run_checkpoint(epoch)), path)


def test_a_rewound_run_is_continued_not_the_abandoned_later_epochs(tmp_path: Path) -> None:
    """Run A trained epochs 0-5; run B resumed epoch 1 and was killed after writing epoch 2's file (before its
    latest.pth). Auto-resume must continue B, whose files were written last, not A's higher-numbered ones."""
    a = start_timeline(config_for(tmp_path), None, CPU, LOGGER)
    for epoch in range(6):
        save(a, tmp_path, epoch)
    rewind = config_for(tmp_path, tmp_path / "ckpt_epoch_1.pth")
    resume = choose_resume(rewind, CPU, LOGGER)
    assert resume.path.name == "ckpt_epoch_1.pth" and not resume.continues
    b = start_timeline(rewind, resume, CPU, LOGGER)
    assert b.run_id != a.run_id and b.next_seq > a.next_seq - 1
    save(b, tmp_path, 2, files=("epoch",))
    found = choose_resume(config_for(tmp_path), CPU, LOGGER)
    assert found.path.name == "ckpt_epoch_2.pth" and found.checkpoint["run_id"] == b.run_id and found.continues
    continued = start_timeline(config_for(tmp_path), found, CPU, LOGGER)
    assert (continued.run_id, continued.resumed_from) == (b.run_id, b.resumed_from)
    save(continued, tmp_path, 3)
    assert choose_resume(config_for(tmp_path), CPU, LOGGER).path.name == "latest.pth"


def test_pruning_spares_the_resumed_file_and_files_of_other_runs(tmp_path: Path) -> None:
    a = start_timeline(config_for(tmp_path), None, CPU, LOGGER)
    for epoch in range(5):
        save(a, tmp_path, epoch)
    rewind = config_for(tmp_path, tmp_path / "ckpt_epoch_0.pth")
    b = start_timeline(rewind, choose_resume(rewind, CPU, LOGGER), CPU, LOGGER)
    removed = []
    for epoch in (1, 2):
        save(b, tmp_path, epoch)
        removed += prune_checkpoints(b, keep=1)
    assert [p.name for p in removed] == ["ckpt_epoch_1.pth"]  # B's own older file only
    assert sorted(p.name for p in tmp_path.glob("ckpt_epoch_*.pth")) == [
        "ckpt_epoch_0.pth", "ckpt_epoch_2.pth", "ckpt_epoch_3.pth", "ckpt_epoch_4.pth"]
    # A run that continues A from one of its epoch files (its latest.pth lost) never deletes that file.
    (tmp_path / "latest.pth").unlink()
    again = Resume(tmp_path / "ckpt_epoch_3.pth", load_checkpoint_file(tmp_path / "ckpt_epoch_3.pth"), True)
    c = start_timeline(config_for(tmp_path), again, CPU, LOGGER)
    assert c.run_id == a.run_id
    save(c, tmp_path, 5)
    assert sorted(p.name for p in prune_checkpoints(c, keep=1)) == ["ckpt_epoch_4.pth"]
    assert (tmp_path / "ckpt_epoch_3.pth").exists() and (tmp_path / "ckpt_epoch_0.pth").exists()


def test_the_same_resume_command_continues_what_it_wrote(tmp_path: Path, caplog) -> None:
    source = tmp_path / "elsewhere" / "ckpt_epoch_1.pth"
    source.parent.mkdir()
    save_checkpoint(run_checkpoint(1), source)  # a file of an older version: no timeline fields
    folder = tmp_path / "run"
    command = config_for(folder, source)
    first = start_timeline(command, choose_resume(command, CPU, LOGGER), CPU, LOGGER)
    folder.mkdir()
    save_checkpoint(first.stamp(folder / "latest.pth", run_checkpoint(2, step=3)), folder / "latest.pth")
    with caplog.at_level(logging.INFO):
        resume = choose_resume(command, CPU, logging.getLogger("requeued"))  # preempted, requeued: same command
    assert resume.path == folder / "latest.pth" and resume.continues
    assert (resume.checkpoint["epoch"], resume.checkpoint["step"]) == (2, 3)
    assert f"holds checkpoints that this run wrote after --resume {source}: continuing from latest.pth" in caplog.text
    assert start_timeline(command, resume, CPU, LOGGER).run_id == first.run_id
    # Another file to resume from is another run's start.
    other = tmp_path / "elsewhere" / "other.pth"
    shutil.copy(source, other)
    assert choose_resume(config_for(folder, other), CPU, LOGGER).path == other


def test_metrics_rows_are_reconciled_with_the_resumed_checkpoint(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "acc1": e}) + "\n" for e in (0, 1, 2, 1))
                                            + '{"epoch": 3, "ac')  # a row cut short by a kill
    assert [r["epoch"] for r in log.reconcile(None, last_epoch=2)] == [0, 1, 2]  # older checkpoints: the file's own
    saved = [{"epoch": 0, "acc1": 10.0}, {"epoch": 1, "acc1": 11.0}]  # the rows the resumed checkpoint carries
    assert log.reconcile(saved, last_epoch=1) == saved
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == saved
    log.close()


class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_peeking_at_a_checkpoint_reads_its_record_and_runs_nothing(tmp_path: Path) -> None:
    torch.save({"epoch": 4, "step": 2, "save_seq": 9, "run_id": "r", "payload": Evil(tmp_path / "pwned"),
                "model": {"w": torch.ones(3)}}, tmp_path / "c.pth")
    assert peek_checkpoint(tmp_path / "c.pth") == {"save_seq": 9, "run_id": "r", "resumed_from": None, "epoch": 4,
                                                   "step": 2}
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        peek_checkpoint(tmp_path / "bad.pth")


# ---------------------------------------------------------------------------------------------------------------
# End to end: kills between a checkpoint and its row, a rewind with pruning, and a requeued --resume run.

# Runs main.py and SIGKILLs itself after epoch 1's checkpoints are written, before its metrics row.
KILLED_BEFORE_ROW = textwrap.dedent("""
    import os, runpy, signal, sys
    sys.path.insert(0, os.environ["REPO"])
    import logger

    real_write = logger.MetricsLog.write
    def dying_write(self, row):
        if row["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, row)
    logger.MetricsLog.write = dying_write
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.environ["REPO"], "main.py"), run_name="__main__")
""")


def killed_before_row(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "killed.py").write_text(KILLED_BEFORE_ROW)
    return subprocess.run([sys.executable, "killed.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "REPO": str(REPO), "OMP_NUM_THREADS": "1"})


def epochs_of_rows(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def four_epochs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A config and the output folder of a finished 4-epoch run."""
    root = tmp_path_factory.mktemp("four")
    images = write_image_folder(root / "images", classes=3, train_per_class=4, val_per_class=2)
    config = write_config(root / "config.yaml", images, root / "out", {"TRAIN": {"EPOCHS": 4}})
    result = launch(["--cfg", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    return config, run_dir(root / "out")


def copy_of(four_epochs: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    config, out = four_epochs
    shutil.copytree(out, tmp_path / "out" / "tiny" / "run")
    text = config.read_text().replace(str(out.parents[1]), str(tmp_path / "out"))
    (tmp_path / "config.yaml").write_text(text)
    return tmp_path / "config.yaml", run_dir(tmp_path / "out")


@pytest.mark.slow
def test_a_rewound_run_killed_before_its_row_is_continued_and_pruning_spares_others(four_epochs, tmp_path) -> None:
    config, out = copy_of(four_epochs, tmp_path)
    rewind = ["--cfg", str(config), "--resume", str(out / "ckpt_epoch_0.pth"), "--opts", "TRAIN.KEEP_CHECKPOINTS", "1"]
    killed = killed_before_row(rewind, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert (out / "ckpt_epoch_0.pth").exists()  # the file the run resumed from
    assert sorted(p.name for p in out.glob("ckpt_epoch_*.pth")) == [
        "ckpt_epoch_0.pth", "ckpt_epoch_1.pth", "ckpt_epoch_2.pth", "ckpt_epoch_3.pth"]  # the rewound run's 1, A's 2, 3
    resumed = launch(["--cfg", str(config), "--opts", "TRAIN.KEEP_CHECKPOINTS", "1"])  # auto-resume
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from " + str(out / "latest.pth") + ": epoch 1" in plain(resumed.stdout)
    assert "training epochs 2..3" in resumed.stdout
    assert epochs_of_rows(out) == [0, 1, 2, 3]
    assert sorted(p.name for p in out.glob("ckpt_epoch_*.pth")) == ["ckpt_epoch_0.pth", "ckpt_epoch_3.pth"]


@pytest.mark.slow
def test_a_requeued_resume_command_continues_from_what_it_wrote(four_epochs, tmp_path) -> None:
    config, out = copy_of(four_epochs, tmp_path)
    source = tmp_path / "start.pth"
    shutil.copy(out / "ckpt_epoch_0.pth", source)
    shutil.rmtree(out)
    command = ["--cfg", str(config), "--resume", str(source)]
    killed = killed_before_row(command, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    again = launch(command)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (f"holds checkpoints that this run wrote after --resume {source}: continuing from latest.pth (epoch 1, "
            "step 0), not from that file") in plain(again.stdout)
    assert "training epochs 2..3" in again.stdout
    assert epochs_of_rows(out) == [0, 1, 2, 3]  # epoch 0's row comes from the file it started from
