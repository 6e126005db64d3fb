"""Launching on clusters: two torchrun launchers as two nodes, and tasks that srun starts without torchrun."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import IO

import pytest
import torch
from run_helpers import REPO, launch, run_dir, write_config, write_image_folder

from checkpoint import load_checkpoint_file
from distributed import SLURM_PORT_BASE, first_host, launch_variables


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(output: str) -> str:
    return re.findall(r" \* Acc@1 [\d.]+ Acc@5 [\d.]+", output)[-1]


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node07", "node07"), ("gpu[007-009,012],cpu01", "gpu007"), ("a-b[3]", "a-b3"), ("n1,n2", "n1"),
])
def test_first_host_of_a_slurm_node_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_launch_variables_prefer_torchrun_then_srun() -> None:
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[04-05]",
             "SLURM_JOB_ID": "123"}
    assert launch_variables({**slurm, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == (2, 4, 0, "env://")
    assert launch_variables({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: a plain process
    assert launch_variables({}) is None
    assert launch_variables(slurm) == (5, 8, 1, f"tcp://gpu04:{SLURM_PORT_BASE + 123}")
    assert launch_variables({**slurm, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2222"}).init_method == (
        "tcp://10.0.0.1:2222")


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cluster")
    images = write_image_folder(root / "images", classes=3, train_per_class=8, val_per_class=5)
    return write_config(root / "config.yaml", images, root / "out", {"TRAIN": {"EPOCHS": 1}}), root


def start(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, IO[str], IO[str]]:
    """A process with its output going to temporary files: pipes that nobody drains while the other process of
    the pair is waited for would fill and stall both."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                               stdout=out, stderr=err, text=True)
    return process, out, err


def finish(started: list[tuple[subprocess.Popen, IO[str], IO[str]]]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process once all have ended."""
    codes = [process.wait(timeout=300) for process, _, _ in started]
    results = []
    for code, (_, out, err) in zip(codes, started, strict=True):
        out.seek(0)
        err.seek(0)
        results.append((code, out.read(), err.read()))
    return results


@pytest.mark.slow
def test_two_launchers_as_two_nodes_train_and_evaluate_like_one_process(cluster_run: tuple[Path, Path]) -> None:
    """torchrun --nnodes 2 with a c10d rendezvous, each "node" with its own output folder (node-local disks):
    only global rank 0 writes checkpoints, and the 2-node evaluation equals a single-process one."""
    config, root = cluster_run
    endpoint = f"127.0.0.1:{free_port()}"

    def node(output: Path, *args: str) -> tuple[subprocess.Popen, IO[str], IO[str]]:
        return start(["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
                      "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", output.parent.name, "main.py", "--cfg",
                      str(config), "--output", str(output), *args], {})

    outputs = [root / "nodes" / "a", root / "nodes" / "b"]
    results = finish([node(output) for output in outputs])
    assert all(code == 0 for code, _, _ in results), results
    writers = [output for output in outputs if list(run_dir(output).glob("*.pth"))]
    assert len(writers) == 1  # one node holds global rank 0
    other = next(output for output in outputs if output not in writers)
    assert (run_dir(other) / "log_rank1.txt").exists() and not (run_dir(other) / "config.yaml").exists()
    checkpoint = run_dir(writers[0]) / "ckpt_epoch_0.pth"
    assert load_checkpoint_file(checkpoint)["world_size"] == 2

    endpoint = f"127.0.0.1:{free_port()}"
    evaluations = finish([node(root / "eval" / "a", "--eval", "--resume", str(checkpoint)),
                          node(root / "eval" / "b", "--eval", "--resume", str(checkpoint))])
    single = launch(["--cfg", str(config), "--output", str(root / "single"), "--eval", "--resume", str(checkpoint)])
    assert single.returncode == 0 and all(code == 0 for code, _, _ in evaluations), evaluations
    printed = [out for _, out, _ in evaluations if " * Acc@1" in out]
    assert len(printed) == 1 and summary(printed[0]) == summary(single.stdout)


@pytest.mark.slow
def test_tasks_started_by_srun_without_torchrun_form_one_run(cluster_run: tuple[Path, Path]) -> None:
    config, root = cluster_run
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(free_port() - SLURM_PORT_BASE)}
    tasks = [start(["main.py", "--cfg", str(config), "--output", str(root / "srun")],
                   {**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}) for rank in (0, 1)]
    results = finish(tasks)
    assert all(code == 0 for code, _, _ in results), results
    out = run_dir(root / "srun")
    assert load_checkpoint_file(out / "ckpt_epoch_0.pth")["world_size"] == 2
    assert "rank 1 of 2" in (out / "log_rank1.txt").read_text()


def test_tf32_and_autotuning_follow_the_config() -> None:
    from distributed import configure_backends

    try:
        configure_backends(deterministic=False, tf32=True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.benchmark
        configure_backends(deterministic=False, tf32=False)
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "none"
        torch.backends.cudnn.benchmark = False


# srun runs its command once, here; python only shows its arguments.
FAKE_COMMANDS = {
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "python": "#!/bin/sh\nprintf '%s|' \"$@\"\necho\n",
    "scontrol": "#!/bin/sh\necho gpu07\necho gpu08\n",
}


@pytest.mark.parametrize(("style", "expected"), [
    ("srun", "main.py|--cfg|configs/x.yaml|--data-path|/data/a b|"),
    ("torchrun", "-m|torch.distributed.run|--nnodes=2|--nproc_per_node=4|--rdzv-backend=c10d|"
                 "--rdzv-endpoint=gpu07:29500|--rdzv-id=99|--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1|"
                 "--shutdown-timeout=170|main.py|--cfg|configs/x.yaml|--data-path|/data/a b|"),
])
def test_slurm_template_starts_main_py_in_both_styles(style: str, expected: str, tmp_path: Path) -> None:
    for name, text in FAKE_COMMANDS.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "LAUNCH": style, "SLURM_JOB_ID": "99",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_SUBMIT_DIR": str(REPO)}
    env.pop("MASTER_PORT", None)
    result = subprocess.run(["bash", str(REPO / "tools" / "slurm_train.sh"), "configs/x.yaml", "--data-path",
                             "/data/a b"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


# Stands in for main.py under the template: waits for a preemption signal as main.py does, then says which came.
WAITING_MAIN = textwrap.dedent("""
    import os, pathlib, sys, time
    from distributed import EXIT_PREEMPTED, PreemptionSignal

    with PreemptionSignal() as preemption, preemption.deferred():
        pathlib.Path("ready").write_text(str(os.getpid()))
        deadline = time.time() + 60
        while preemption.received is None and time.time() < deadline:
            time.sleep(0.05)
    pathlib.Path("stopped").write_text(str(preemption.received))
    sys.exit(EXIT_PREEMPTED)
""")


@pytest.mark.slow  # starts torchrun; test_slurm_template_starts_main_py_in_both_styles checks its command fast
def test_the_torchrun_style_passes_slurms_sigusr1_on_to_its_processes(tmp_path: Path) -> None:
    """SLURM sends --signal=USR1 to the task srun started, torchrun, which by default dies of it and leaves its
    processes running, never told of the time limit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"srun": '#!/bin/bash\necho $$ > "$(dirname "$0")/task.pid"\nwhile [[ "$1" == --* ]]; do shift; done\n'
                     'exec "$@"\n',
             "scontrol": "#!/bin/sh\necho 127.0.0.1\n"}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "main.py").write_text(WAITING_MAIN)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "LAUNCH": "torchrun",
           "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_SUBMIT_DIR": str(tmp_path), "MASTER_PORT": str(free_port())}
    log = tempfile.TemporaryFile("w+")
    job = subprocess.Popen(["bash", str(REPO / "tools" / "slurm_train.sh"), "configs/x.yaml"], env=env, stdout=log,
                           stderr=log, text=True)
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    try:
        deadline = time.time() + 120
        while not ready.exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the process torchrun started never came up"
        os.kill(int((bin_dir / "task.pid").read_text()), signal.SIGUSR1)  # srun's task: torchrun, exec'd
        job.wait(timeout=60)
        deadline = time.time() + 10
        while not stopped.exists() and time.time() < deadline:
            time.sleep(0.1)
        log.seek(0)
        assert stopped.exists() and stopped.read_text() == str(int(signal.SIGUSR1)), log.read()
    finally:
        if job.poll() is None:
            job.kill()
        if ready.exists() and not stopped.exists():  # an orphan still waiting
            os.kill(int(ready.read_text()), signal.SIGKILL)
