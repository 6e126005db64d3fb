"""One training run per output folder: global rank 0 holds ``OUTPUT/run.lock``, which names its host and process.

A second run into the folder refuses at once, naming the holder. The lock of a run that is gone never blocks the
next one: it is taken over when its process is not running (same host), when it belongs to an earlier run of the
same SLURM job (a requeued job starts only after the previous one ended), or when its holder has not renewed it
(a heartbeat on its modification time, every ``HEARTBEAT_S``) for ``STALE_AFTER_S``, as after a lost node. The
lock is advisory: it is created with O_CREAT | O_EXCL, which is atomic on local disks and on NFS v3 or later, and
ages are read on the file server's clock (a probe file's time), so the hosts' clocks need not agree.
"""

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import DistEnv, on_rank0
from utils import RunError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class FolderInUseError(RunError):
    """The output folder is held by another run that is still alive."""


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _file_system_now(folder: Path) -> float:
    """The time on the file system's clock (a network file system's server stamps the files it creates)."""
    probe = folder / f".clock.{os.getpid()}-{secrets.token_hex(4)}"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"process {holder.get('pid')} on {holder.get('host')}, started {started}"


class RunLock:
    """The lock file of one output folder, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, folder: Path, logger: logging.Logger) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.logger = logger
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "slurm_job": os.environ.get("SLURM_JOB_ID", ""), "token": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _gone(self, holder: dict[str, Any] | None, age: float) -> str | None:
        """Why the run that holds the lock is gone, or None while it may be alive."""
        if age > STALE_AFTER_S:
            return f"its lock was last renewed {age:.0f} s ago"
        if holder is None:
            return None  # being written by a run that is starting now
        if holder.get("host") == self.holder["host"] and not _process_running(int(holder.get("pid", 0))):
            return "that process is not running"
        if holder.get("slurm_job") and holder["slurm_job"] == self.holder["slurm_job"]:
            return f"an earlier run of SLURM job {holder['slurm_job']}, which was requeued"
        return None

    def acquire(self) -> None:
        """Create the lock, taking over that of a run that is gone; then keep it renewed.

        Raises:
            FolderInUseError: another run holds the folder; one line naming its host and process.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock taken over can be taken by another starting run first
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_gone()
                continue
            with os.fdopen(descriptor, "w") as f:
                json.dump(self.holder, f)
                f.flush()
                os.fsync(f.fileno())
            self._heartbeat = threading.Thread(target=self._renew, name="run-lock-heartbeat", daemon=True)
            self._heartbeat.start()
            self._remove_leftover_temporary_files()
            return
        raise FolderInUseError(f"output folder {self.folder} is being taken by another run that is starting; "
                               "choose another --output/--tag")

    def _take_over_if_gone(self) -> None:
        try:
            text = self.path.read_text()
            age = _file_system_now(self.folder) - self.path.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            return
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        reason = self._gone(holder, age)
        if reason is None:
            who = describe(holder) if holder else "another run that is starting"
            raise FolderInUseError(
                f"output folder {self.folder} is in use by {who}; let it finish or choose another --output/--tag "
                f"(if that run is gone, delete {self.path} or wait {STALE_AFTER_S / 60:.0f} minutes)")
        with contextlib.suppress(FileNotFoundError):
            if self.path.read_text() == text:  # not taken over by another run meanwhile
                self.path.unlink()
                self.logger.warning(f"took over {self.path} from a run that is gone "
                                    f"({describe(holder) if holder else 'an empty lock'}: {reason})")

    def _remove_leftover_temporary_files(self) -> None:
        """Checkpoint writes that a killed run left half done (only the lock's holder writes here)."""
        leftovers = sorted(self.folder.glob("*.tmp"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        if leftovers:
            self.logger.info(f"removed {len(leftovers)} temporary file(s) left by an interrupted write: "
                             f"{', '.join(p.name for p in leftovers)}")

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a network file system's hiccup: the next beat tries again
                os.utime(self.path)

    def release(self) -> None:
        """Stop renewing and delete the lock, if it is still this run's."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.holder["token"]:
                self.path.unlink()


@contextlib.contextmanager
def hold_folder(folder: Path, env: DistEnv, logger: logging.Logger) -> Iterator[None]:
    """Hold ``folder``'s lock on global rank 0 for the block; a refusal stops every rank with the same line."""
    lock = RunLock(folder, logger) if env.is_main else None
    on_rank0(lambda: lock.acquire(), env)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
