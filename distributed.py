"""Process-group set-up and the collectives a run needs: one plain process, or many under torchrun or srun.

NCCL carries the collectives between CUDA devices and gloo between CPU processes. Every helper here is a
no-op (or the identity) for a single process, so callers need no rank checks.
"""

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist

from utils import RunError

# The signals that ask a run to stop: those a cluster sends before it stops a job (SLURM: --signal=USR1@<seconds>,
# and TERM at preemption), and Ctrl-C's. The exit status of a run that stopped for one after saving where it was
# (sysexits' EX_TEMPFAIL); a run ended at once by one exits with 128 + the signal's number, as a shell reports it.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)
EXIT_PREEMPTED = 75
# A signal this soon after the first is the same request again: SLURM signals every process of a job step and
# torchrun passes the signal on to its processes too, and a terminal's Ctrl-C reaches torchrun and its processes.
REPEAT_WINDOW_S = 2.0

# Port of the rendezvous of tasks that srun started directly, offset by the job id so that jobs sharing
# a node do not collide; MASTER_PORT overrides it.
SLURM_PORT_BASE = 15000

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, local_rank: int) -> torch.device:
    """Map DEVICE (one of config.DEVICES: 'auto', 'cpu' or 'cuda') to this process's device; 'auto' prefers CUDA
    when present.

    Where the launcher shows each process only its own GPUs (srun --gpus-per-task), the local rank is
    taken modulo the visible devices.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("DEVICE is 'cuda' but no CUDA device is visible; use DEVICE auto or cpu.")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu01" -> "gpu07" (zero padding kept)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise RunError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node's address")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


class Launch(NamedTuple):
    """How this process joins its run: its ranks and the rendezvous address for init_process_group."""

    rank: int
    world_size: int
    local_rank: int
    init_method: str


def launch_variables(env: Mapping[str, str]) -> Launch | None:
    """How a process started by torchrun, or by srun without torchrun, joins its run; None for a plain process.

    torchrun's variables win (srun + torchrun sets both). For tasks that srun started directly, SLURM's
    variables give the ranks, and the rendezvous is MASTER_ADDR:MASTER_PORT when set, else the job's first
    node at SLURM_PORT_BASE + job id % 20000.
    """
    if "RANK" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "env://")
    if int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return None
    address = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    port = env.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                  f"tcp://{address}:{port}")


def init_distributed(device_choice: str) -> DistEnv:
    """Join the process group when launched by torchrun or srun, else run as a plain single process."""
    launch = launch_variables(os.environ)
    if launch is None:
        return DistEnv(rank=0, world_size=1, local_rank=0, device=resolve_device(device_choice, 0))
    device = resolve_device(device_choice, launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method=launch.init_method,
                            rank=launch.rank, world_size=launch.world_size)
    return DistEnv(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=device)


def destroy_distributed() -> None:
    """Leave the process group if this process joined one (torchrun with a single process included)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op for one process) and return it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: T, env: DistEnv) -> T:
    """Rank 0's ``obj`` on every rank (pickled between this job's own processes)."""
    if not env.distributed:
        return obj
    holder = [obj if env.is_main else None]
    dist.broadcast_object_list(holder, src=0, device=env.device if env.device.type == "cuda" else None)
    return holder[0]


def gather_to_rank0(obj: T, env: DistEnv) -> list[T] | None:
    """Every rank's ``obj`` as a list in rank order on rank 0 (pickled between this job's own processes); None on
    the other ranks. Under NCCL the pickles pass through the device that ``init_distributed`` set."""
    if not env.distributed:
        return [obj]
    gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def on_rank0(fn: Callable[[], T], env: DistEnv) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    A :class:`RunError` raised there is raised again on every rank with the same message, so that all ranks
    stop together instead of waiting for rank 0 in the next collective.
    """
    result: Any = None
    error: tuple[type[RunError], str] | None = None
    if env.is_main:
        try:
            result = fn()
        except RunError as e:
            error = (type(e), str(e))
    result, error = broadcast_object((result, error), env)
    if error is not None:
        raise error[0](error[1])
    return result


def configure_backends(deterministic: bool, tf32: bool) -> None:
    """Process-wide kernel choices: cuDNN autotuning unless deterministic, and TensorFloat-32 for float32
    matmuls and convolutions on GPUs that have it (10 mantissa bits, as good as float32 for training here)."""
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def set_cpu_threads(data_workers: int, env: DistEnv) -> int | None:
    """On the CPU, leave a core to each data worker unless OMP_NUM_THREADS says otherwise; returns the thread
    count set, or None when it was left alone.

    Compute threads that share cores with the workers spin while waiting for each other, which was measured to
    slow a demo step tenfold on two cores; torchrun already sets OMP_NUM_THREADS=1 for several processes.
    """
    if env.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) - data_workers)
    torch.set_num_threads(threads)
    return threads


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Whether ``flag`` is set on any rank (the same answer on every rank)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=env.device), env).item())


class RunInterrupted(BaseException):
    """A stop signal that cannot wait for the end of an update: a second one, or one outside the update loop.

    A BaseException, like KeyboardInterrupt, so that the handlers of a reader or decoder (which catch Exception)
    let it through to ``main``, which ends the run with one line and exit status 128 + the signal's number.
    """

    def __init__(self, signum: int, repeated: bool) -> None:
        super().__init__(signum)
        self.signum = signum
        self.repeated = repeated

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        why = "a second stop signal" if self.repeated else "outside the update loop"
        return (f"{signal.Signals(self.signum).name} ({why}): the run stopped at once without saving the unfinished "
                f"epoch; the same command resumes from the last checkpoint (exit status {self.exit_status})")


class PreemptionSignal:
    """Within ``with``: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) ask the run to stop.

    Inside :meth:`deferred` (the update loop and the epoch's saving) the first one is recorded in ``received``,
    so the run can finish its update and save where it is. Anywhere else (listing a dataset, loading a zip cache,
    validating, a hung read), or a second one, raises :class:`RunInterrupted` at once, which ends the run without
    a partial file (writes go to a temporary file, removed as the exception passes). A copy of the first signal
    within ``REPEAT_WINDOW_S`` is the same request and changes nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0
        self._deferring = False
        self._ending = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        repeat = self.received is not None and time.monotonic() - self._received_at < REPEAT_WINDOW_S
        if self._ending or repeat:
            return
        if self.received is None and self._deferring:
            self.received, self._received_at = signum, time.monotonic()
            return
        self._ending = True  # signals that follow while the run unwinds change nothing
        raise RunInterrupted(signum, repeated=self.received is not None)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block in which the first stop signal waits to be acted on (see the class)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def __enter__(self) -> "PreemptionSignal":
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def ignore_preemption_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: loader workers ignore SIGTERM, SIGUSR1 and SIGINT, which the main process
    handles.

    A cluster signals every process of a job, loader workers included, and torch's workers die on a SIGTERM
    that their parent did not send: the main process would then fail at its next batch instead of finishing
    its update and saving (and a terminal's Ctrl-C reaches them too). The main process ends its workers itself
    when it stops.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def requeue_slurm_job(logger: logging.Logger) -> None:
    """Under SLURM, put the job back in the queue when it was submitted with requeueing allowed."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return
    if shutil.which("scontrol") is None:
        logger.warning(f"SLURM job {job}: scontrol is not on PATH, so the job is not requeued; resubmit it")
        return
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    if "Requeue=1" not in shown.stdout:
        logger.info(f"SLURM job {job} does not allow requeueing (sbatch --requeue); resubmit it to continue")
        return
    requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if requeued.returncode == 0:
        logger.info(f"SLURM job {job} requeued; it resumes from the checkpoint just written")
    else:
        logger.warning(f"scontrol requeue {job} failed ({requeued.stderr.strip()}); resubmit the job")
