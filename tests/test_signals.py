"""Stop signals: Ctrl-C saves like SIGTERM, a second signal or one outside the update loop ends the run at once, and
nothing that is not a regular file is opened as an image."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from run_helpers import REPO, plain, run_dir, write_config, write_image_folder

from checkpoint import load_checkpoint_file
from data.datasets import UnreadableImageError, read_image
from distributed import EXIT_PREEMPTED, REPEAT_WINDOW_S


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def test_a_named_pipe_called_jpg_is_an_unreadable_image_not_a_hang(tmp_path: Path) -> None:
    pipe = tmp_path / "x.jpg"
    os.mkfifo(pipe)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_image(str(pipe))
            outcome.append(None)
        except UnreadableImageError as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # opening it blocked: let it go by opening the other end, then fail
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("opening a named pipe as an image blocked")
    assert outcome and str(outcome[0]) == f"{pipe}: not a regular file (a named pipe)"
    with pytest.raises(UnreadableImageError, match="not a regular file \\(a folder\\)"):
        read_image(str(tmp_path))


# Runs main.py with a stop signal sent at a chosen moment: "ctrl-c" during update 2; "twice" a SIGINT during
# update 2, then a SIGTERM past the repeat window while the position checkpoint is half written; "listing" hangs
# reading a named pipe while the datasets are built, after writing "ready" (the test sends SIGTERM then).
SIGNALLED_RUN = textwrap.dedent("""
    import io, os, runpy, signal, sys, time
    sys.path.insert(0, os.getcwd())
    import torch
    import data
    import engine

    moment, wait = sys.argv[1], float(sys.argv[2])
    real_update = engine._optimizer_update
    def signalled_update(state, settings, where):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_update(state, settings, where)
    if moment in ("ctrl-c", "twice"):
        engine._optimizer_update = signalled_update
    if moment == "twice":
        real_save = torch.save
        def interrupted_save(obj, f):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:1000])
            time.sleep(wait)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal ends the run before this ends
            f.write(buffer.getvalue()[1000:])
        torch.save = interrupted_save
    if moment == "listing":
        def hung_listing(*args, **kwargs):
            os.mkfifo("pipe")
            open("ready", "w").close()
            open("pipe").read()  # no writer: blocks for ever
        data.build_loader = hung_listing
    sys.argv = ["main.py", *sys.argv[3:]]
    runpy.run_path(os.path.join(os.environ["REPO"], "main.py"), run_name="__main__")
""")


def start_run(moment: str, config: Path, cwd: Path) -> tuple[subprocess.Popen, tempfile.TemporaryFile]:
    script = cwd / "signalled.py"
    script.write_text(SIGNALLED_RUN)
    log = tempfile.TemporaryFile("w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPO": str(REPO), "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(script), moment, str(REPEAT_WINDOW_S + 0.5), "--cfg",
                                str(config)], cwd=cwd, env=env, stdout=log, stderr=subprocess.PIPE, text=True)
    return process, log


def finish(process: subprocess.Popen, log, timeout: float = 120) -> tuple[int, str, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    log.seek(0)
    return process.returncode, plain(log.read()), plain(err)


def test_ctrl_c_finishes_the_update_saves_the_position_and_exits_75(images: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {"TRAIN": {"EPOCHS": 2}})
    code, out, err = finish(*start_run("ctrl-c", config, tmp_path))
    assert code == EXIT_PREEMPTED, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "stopped on SIGINT after saving where the run is; the same command resumes (exit status 75)" in out
    saved = load_checkpoint_file(run_dir(tmp_path / "out") / "latest.pth")
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (-1, 3, 3)  # the request is read at the next update


def test_a_second_signal_ends_the_run_at_once_without_a_partial_file(images: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {"TRAIN": {"EPOCHS": 2}})
    started = time.monotonic()
    code, out, err = finish(*start_run("twice", config, tmp_path))
    assert code == 128 + signal.SIGTERM, out + err
    assert time.monotonic() - started < 60
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and "SIGTERM (a second stop signal): the run stopped at once" in errors[0], err
    assert sorted(p.name for p in run_dir(tmp_path / "out").iterdir() if p.suffix in (".pth", ".tmp")) == []


def test_a_signal_outside_the_update_loop_ends_a_hung_run_at_once(images: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {"TRAIN": {"EPOCHS": 2}})
    process, log = start_run("listing", config, tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "ready").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "ready").exists(), finish(process, log, timeout=1)
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process, log, timeout=30)
    assert code == 128 + signal.SIGTERM, out + err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and "SIGTERM (outside the update loop): the run stopped at once" in errors[0], err
