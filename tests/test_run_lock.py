"""One run per output folder: a second run refuses naming the holder, and a run that is gone never blocks the next."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from run_helpers import REPO, launch, plain, run_dir, write_config, write_image_folder

import run_lock
from run_lock import LOCK_NAME, STALE_AFTER_S, FolderInUseError, RunLock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(folder: Path, age: float = 0.0, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - age,
                                "slurm_job": "", "token": "theirs", **holder}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_second_lock_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = RunLock(tmp_path, logging.Logger("first"))
    first.acquire()
    try:
        with pytest.raises(FolderInUseError) as refused:
            RunLock(tmp_path, logging.Logger("second")).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"output folder {tmp_path} is in use by process {os.getpid()} on {socket.gethostname()}" in message
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == first.holder["token"]
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = RunLock(tmp_path, logging.Logger("second"))
    second.acquire()  # free again
    second.release()


@pytest.mark.parametrize(("holder", "age", "reason"), [
    ({"pid": None}, 0.0, "that process is not running"),  # kill -9 on this host
    ({"host": "lost-node", "pid": 1}, STALE_AFTER_S + 60, "its lock was last renewed"),  # a lost node
    ({"host": "other-node", "pid": 1, "slurm_job": "77"}, 0.0, "an earlier run of SLURM job 77"),  # requeued
], ids=["dead-process", "lost-node", "requeued-job"])
def test_the_lock_of_a_run_that_is_gone_is_taken_over(holder: dict, age: float, reason: str, tmp_path: Path,
                                                      monkeypatch, caplog) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    holder = {**holder, "pid": holder["pid"] or dead_pid()}
    write_lock(tmp_path, age, **holder)
    (tmp_path / "latest.pth.123-abcd.tmp").write_bytes(b"half a checkpoint")  # left by the dead run's write
    lock = RunLock(tmp_path, logging.getLogger("taker"))
    with caplog.at_level(logging.INFO, logger="taker"):
        lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.holder["token"]
        assert f"from a run that is gone (process {holder['pid']} on {holder.get('host', socket.gethostname())}" \
               in caplog.text and reason in caplog.text
        assert not list(tmp_path.glob("*.tmp"))
    finally:
        lock.release()


def test_a_live_lock_of_another_host_is_respected_until_it_goes_stale(tmp_path: Path, monkeypatch) -> None:
    write_lock(tmp_path, age=60, host="node-b", pid=4242)
    with pytest.raises(FolderInUseError, match="in use by process 4242 on node-b"):
        RunLock(tmp_path, logging.Logger("x")).acquire()
    monkeypatch.setattr(run_lock, "STALE_AFTER_S", 30.0)
    lock = RunLock(tmp_path, logging.Logger("x"))
    lock.acquire()
    lock.release()


def test_the_holder_renews_its_lock(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path, logging.Logger("x"))
    lock.acquire()
    try:
        os.utime(tmp_path / LOCK_NAME, (0, 0))
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5
    finally:
        lock.release()


# Runs main.py and waits inside its second update, after writing "ready", until it is killed.
PAUSED_RUN = textwrap.dedent("""
    import os, runpy, sys, time
    sys.path.insert(0, os.environ["REPO"])
    import engine

    real_update = engine._optimizer_update
    def paused_update(state, settings, where):
        if state.global_step == 1:
            open("ready", "w").close()
            time.sleep(300)
        return real_update(state, settings, where)
    engine._optimizer_update = paused_update
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.environ["REPO"], "main.py"), run_name="__main__")
""")


@pytest.mark.slow
def test_a_second_run_into_a_folder_refuses_at_once_and_a_killed_runs_lock_never_blocks(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images")
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {"TRAIN": {"EPOCHS": 1}})
    (tmp_path / "paused.py").write_text(PAUSED_RUN)
    log = tempfile.TemporaryFile("w+")
    first = subprocess.Popen([sys.executable, "paused.py", "--cfg", str(config)], cwd=tmp_path, stdout=log, stderr=log,
                             env={**os.environ, "REPO": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ready").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "ready").exists(), log.seek(0) or log.read()
        out = run_dir(tmp_path / "out")
        config_before = (out / "config.yaml").read_text()
        second = launch(["--cfg", str(config), "--opts", "TRAIN.BASE_LR", "0.5"])
        errors = [line for line in plain(second.stderr).splitlines() if line.strip()]
        assert second.returncode == 1 and len(errors) == 1, second.stderr
        assert f"is in use by process {first.pid} on {socket.gethostname()}" in errors[0]
        assert (out / "config.yaml").read_text() == config_before  # the running run's files are untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = launch(["--cfg", str(config)])
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"took over {out / LOCK_NAME} from a run that is gone (process {first.pid}" in plain(third.stdout)
    assert not (out / LOCK_NAME).exists()
