"""Everything that needs a CUDA device, in one run, written up as a Markdown report with each part's time.

    python tools/gpu_check.py --prepare                 # where the git history and a package index are
    python tools/gpu_check.py --report gpu_check.md     # on the GPU machine
    python tools/gpu_check.py --list                    # the parts, their time limits and command lines

The parts run one after another, each in a process of its own under its own time limit, most valuable first:
the CUDA-marked tests; 2-epoch demo trainings with AMP bfloat16, float16 (gradient scaler) and COMPILE True;
evaluation of the bfloat16 run's checkpoint against its own validation; ``--throughput``; ``tools/benchmark.py``
for the four variants at 224, batch 128, bfloat16 autocast, channels-last, eager against the release-equivalent
model (with peak memory) and compiled against eager; with two GPUs or more, a 2-process NCCL training and
evaluation checked against one process. A part that would start past the total budget (``--budget``, sized for
six minutes on one H100) is skipped and reported as such; ``--skip``/``--only`` choose parts by name pattern.

A GPU machine may have neither the git history nor a package index: ``--prepare`` exports the baseline's
``models/`` package to ``.baseline/<rev>`` and downloads the wheels of the packages the GPU image lacks to
``.whl``; both are carried there (see docs/testing.md, "The GPU check"). Without a CUDA device the check stops, after
its other preparations, with one line and exit status 1.
"""

import argparse
import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import benchmark
from cli import ROOT, run_tool  # puts the checkout on the path for the imports below

from utils import RunError

WORK = ROOT / "output" / "gpu_check"  # the check's own folder, emptied at its start
BASELINE = "55ee36f"  # the first, release-equivalent implementation
BASELINE_ROOT = ROOT / ".baseline"
WHEELS = ROOT / ".whl"
# Packages of requirements.txt that the GPU machine's image lacks (its torch, torchvision and timm are its own).
CARRIED = ("yacs", "termcolor")
LOCK_FILE = ROOT / "requirements-lock.txt"
DEVICE_PYTHON = "3.12"
DEMO = ("main.py", "--cfg", "configs/demo/strip_mlp_demo.yaml")
DEMO_RUNS = WORK / "strip_mlp_demo"  # main.py writes OUTPUT/MODEL.NAME/TAG
VARIANTS = ("strip_mlp_tiny_light", "strip_mlp_tiny", "strip_mlp_small", "strip_mlp_base")
# Inference images/s the paper gives (Strip-MLP-T*, T, S, B), measured on its own GPU and settings.
PAPER_IMAGES_PER_S = dict(zip(VARIANTS, (814, 597, 381, 300), strict=True))
DEFAULT_BUDGET_S = 345.0  # six minutes, less the start-up before the first part and the report
MIN_PART_S = 10.0  # a part is not started with less than this left of the budget


class CheckError(RunError):
    """A reason the check cannot start."""


def last_line(output: str) -> str:
    """The last non-empty line of a command's output (pytest's summary, say)."""
    lines = [line.strip() for line in plain(output).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def plain(text: str) -> str:
    """``text`` without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@dataclass(frozen=True)
class Part:
    """One step of the check: a command run from the repository's root, and what to read from it.

    ``summarize(output)`` returns the report's line for a run that exited 0, and raises ``PartFailed`` when
    what the command produced is wrong although it exited 0.
    """

    name: str
    command: tuple[str, ...]
    limit_s: float
    summarize: Callable[[str], str] = last_line
    min_gpus: int = 1


class PartFailed(Exception):
    """A part's command ran but its result is wrong."""


@dataclass
class Outcome:
    """What became of one part."""

    name: str
    status: str  # passed, failed, timed out, skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    summary: str = ""
    log_tail: list[str] = field(default_factory=list)


# ---- reading the parts' results -------------------------------------------------------------------------------

def metrics_rows(run: str) -> list[dict]:
    path = DEMO_RUNS / run / "metrics.jsonl"
    if not path.is_file():
        raise PartFailed(f"{path} was not written")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_training(run: str, epochs: int) -> Callable[[str], str]:
    def summarize(output: str) -> str:
        rows = metrics_rows(run)
        if len(rows) != epochs:
            raise PartFailed(f"{len(rows)} epochs in metrics.jsonl, expected {epochs}")
        last = rows[-1]
        return (f"top-1 {last['acc1']:.2f}% after {epochs} epochs, train loss {last['train_loss']:.3f}, "
                f"{sum(r['skipped_updates'] for r in rows)} skipped updates, "
                f"{sum(r['epoch_time'] for r in rows) / epochs:.1f} s per epoch")
    return summarize


def evaluation(output: str) -> tuple[float, int]:
    """(top-1 %, images) of a ``main.py --eval`` console output."""
    acc1 = re.search(r"\* Acc@1 ([\d.]+)", plain(output))
    images = re.search(r"validation loss [\d.]+ over (\d+) images", plain(output))
    if acc1 is None or images is None:
        raise PartFailed("no ' * Acc@1' and 'validation loss' lines in the output")
    return float(acc1.group(1)), int(images.group(1))


def summarize_evaluation(run: str, label: str) -> Callable[[str], str]:
    """Evaluation of ``run``'s best checkpoint must find the top-1 that its training measured, to one image
    (cuDNN may choose other kernels in another process; the weights and the images are the same)."""
    def summarize(output: str) -> str:
        acc1, images = evaluation(output)
        trained = max(row["acc1"] for row in metrics_rows(run))
        if abs(acc1 - trained) > 100.0 / images + 1e-6:
            raise PartFailed(f"{label} top-1 {acc1:.3f}% differs from the {trained:.3f}% its training measured")
        return f"{label} top-1 {acc1:.3f}% over {images} images; training measured {trained:.3f}%"
    return summarize


def summarize_throughput(output: str) -> str:
    found = re.search(r"batch_size (\d+) throughput ([\d.]+) images/s", plain(output))
    if found is None:
        raise PartFailed("no throughput line in the output")
    return f"{float(found.group(2)):.0f} images/s at batch {found.group(1)} (demo model, 32 px)"


def summarize_ddp_training(output: str) -> str:
    """Two processes of 32 images each (SyncBN) see the batches of one process of 64: same top-1 to a point."""
    single, ddp = metrics_rows("bf16")[-1], metrics_rows("ddp")[-1]
    if abs(single["acc1"] - ddp["acc1"]) > 1.0:
        raise PartFailed(f"2-process top-1 {ddp['acc1']:.2f}% against {single['acc1']:.2f}% in one process")
    return (f"2 processes: top-1 {ddp['acc1']:.2f}%, train loss {ddp['train_loss']:.4f}; one process: "
            f"{single['acc1']:.2f}%, {single['train_loss']:.4f}")


def bench_json(name: str) -> Path:
    return WORK / f"{name}.jsonl"


def summarize_benchmark(name: str) -> Callable[[str], str]:
    def summarize(output: str) -> str:
        path = bench_json(name)
        if not path.is_file():
            raise PartFailed(f"{path} was not written")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return "; ".join(f"{row['implementation']}: " + ", ".join(
            f"{key.split('_img_s')[0]} {row[key]:.0f} img/s" for key in row if key.endswith("_img_s_median"))
            for row in rows)
    return summarize


# ---- the plan ---------------------------------------------------------------------------------------------------

def demo(tag: str, *flags: str, opts: Sequence[str] = ()) -> tuple[str, ...]:
    """A ``main.py`` command line on the demo, on CUDA, writing to the check's folder (``--opts`` comes last)."""
    return (sys.executable, *DEMO, "--output", str(WORK), "--tag", tag, *flags,
            "--opts", "DEVICE", "cuda", *opts)


def torchrun(nproc: int, command: tuple[str, ...]) -> tuple[str, ...]:
    """``command`` (``python main.py ...``) under torchrun with ``nproc`` processes on this machine."""
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *command[1:])


def bench(name: str, model: str, *flags: str) -> tuple[str, ...]:
    return (sys.executable, "tools/benchmark.py", "--model", model, "--img-size", "224", "--batch-size", "128",
            "--dtype", "bf16", "--channels-last", "--warmup", "3", "--repeats", "10", "--json", str(bench_json(name)),
            *flags)


def plan(baseline_folder: Path) -> list[Part]:
    """Every part, most valuable first (a tight budget skips the last ones). Limits are generous guesses for one
    H100; the report gives the times each part took."""
    bf16, fp16 = ("--amp", "--amp-dtype", "bfloat16"), ("--amp", "--amp-dtype", "float16")
    train_opts = ("TRAIN.EPOCHS", "2")
    best = str(DEMO_RUNS / "bf16" / "best.pth")
    parts = [
        Part("tests", (sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"), 150),
        Part("train_bf16", demo("bf16", *bf16, opts=train_opts), 60, summarize_training("bf16", 2)),
        Part("train_fp16", demo("fp16", *fp16, opts=(*train_opts, "CHANNELS_LAST", "True")), 60,
             summarize_training("fp16", 2)),
        Part("eval", demo("eval", "--eval", "--resume", best, *bf16), 40, summarize_evaluation("bf16", "1 process")),
        Part("ddp_train", torchrun(2, demo("ddp", *bf16, opts=(*train_opts, "TRAIN.SYNC_BN", "True",
                                                             "DATA.BATCH_SIZE", "32"))),
             90, summarize_ddp_training, min_gpus=2),
        Part("ddp_eval", torchrun(2, demo("ddp_eval", "--eval", "--resume", best, *bf16)), 60,
             summarize_evaluation("bf16", "2 processes"), min_gpus=2),
        Part("throughput", demo("throughput", "--throughput", *bf16, opts=("DATA.BATCH_SIZE", "128")), 40,
             summarize_throughput),
    ]
    for model in VARIANTS:
        name = f"bench_eager_{model}"
        parts.append(Part(name, bench(name, model, "--mode", "both", "--baseline", str(baseline_folder)), 60,
                          summarize_benchmark(name)))
    parts.append(Part("train_compile", demo("compile", *bf16, opts=(*train_opts, "COMPILE", "True")), 150,
                      summarize_training("compile", 2)))
    for model in ("strip_mlp_tiny", "strip_mlp_tiny_light", "strip_mlp_small", "strip_mlp_base"):
        name = f"bench_compiled_{model}"
        parts.append(Part(name, bench(name, model, "--mode", "eval", "--compile", "--eager-baseline", "--no-memory"),
                          90, summarize_benchmark(name)))
    return parts


def select(parts: list[Part], only: Sequence[str], skip: Sequence[str]) -> list[Part]:
    """The parts whose names match a pattern of ``only`` (all when empty) and none of ``skip``."""
    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    return [p for p in parts if (not only or matches(p.name, only)) and not matches(p.name, skip)]


# ---- running ----------------------------------------------------------------------------------------------------

def run_part(part: Part, limit_s: float, log_folder: Path) -> Outcome:
    """Run one part in a process group of its own (torchrun's and the compiler's workers included) and kill the
    whole group at its time limit; its output goes to ``log_folder/<name>.log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        timed_out = True
    seconds = time.perf_counter() - start
    log_folder.mkdir(parents=True, exist_ok=True)
    (log_folder / f"{part.name}.log").write_text(output)
    tail = plain(output).splitlines()[-15:]
    outcome = Outcome(part.name, "passed", seconds, limit_s, log_tail=tail)
    if timed_out:
        outcome.status, outcome.summary = "timed out", f"stopped at its limit of {limit_s:.0f} s"
    elif process.returncode != 0:
        outcome.status, outcome.summary = "failed", f"exit status {process.returncode}: {last_line(output)}"
    else:
        try:
            outcome.summary = part.summarize(output)
            outcome.log_tail = []
        except (PartFailed, OSError, KeyError, ValueError) as error:
            outcome.status, outcome.summary = "failed", str(error)
    return outcome


def run_parts(parts: list[Part], budget_s: float, gpus: int, log_folder: Path,
              echo: Callable[[str], None] = print) -> list[Outcome]:
    """Run the parts in order within ``budget_s`` seconds in all: each under the smaller of its own limit and
    what is left of the budget, and none that would start with less than MIN_PART_S left."""
    start = time.perf_counter()
    outcomes = []
    for part in parts:
        left = budget_s - (time.perf_counter() - start)
        if part.min_gpus > gpus:
            outcome = Outcome(part.name, "skipped", summary=f"needs {part.min_gpus} GPUs, {gpus} visible")
        elif left < MIN_PART_S:
            outcome = Outcome(part.name, "skipped", summary=f"{max(left, 0):.0f} s left of the {budget_s:.0f} s budget")
        else:
            echo(f"[gpu_check] {part.name} (limit {min(part.limit_s, left):.0f} s): {' '.join(part.command)}")
            outcome = run_part(part, min(part.limit_s, left), log_folder)
        echo(f"[gpu_check] {part.name}: {outcome.status} in {outcome.seconds:.1f} s; {outcome.summary}")
        outcomes.append(outcome)
    return outcomes


# ---- the report -------------------------------------------------------------------------------------------------

def speed_rows(outcomes: list[Outcome], baseline: str) -> list[str]:
    """The speed table: per variant, the paper's figure beside the eager and compiled rows of the benchmark."""
    ran = {o.name for o in outcomes if o.status == "passed"}
    lines = []
    for model in VARIANTS:
        eager, compiled = {}, {}
        if f"bench_eager_{model}" in ran:
            eager = {row["implementation"]: row for row in read_rows(bench_json(f"bench_eager_{model}"))}
        if f"bench_compiled_{model}" in ran:
            compiled = {row["implementation"]: row for row in read_rows(bench_json(f"bench_compiled_{model}"))}
        if not eager and not compiled:
            continue
        current, release, fast = eager.get("current", {}), eager.get(baseline, {}), compiled.get("current", {})

        def rate(row: dict, mode: str) -> str:
            return f"{row[f'{mode}_img_s_median']:.0f}" if f"{mode}_img_s_median" in row else "-"

        memory = (f"{current['eval_peak_mb']:.0f} / {current['train_peak_mb']:.0f}"
                  if "eval_peak_mb" in current and "train_peak_mb" in current else "-")
        lines.append(f"| `{model}` | {PAPER_IMAGES_PER_S[model]} | {rate(release, 'eval')} | {rate(current, 'eval')} | "
                     f"{rate(fast, 'eval')} | {rate(release, 'train')} | {rate(current, 'train')} | {memory} |")
    if not lines:
        return []
    return ["", "## Speed: 224 px, batch 128, bfloat16 autocast, channels-last (images/s, medians of 10 runs)", "",
            f"| model | paper | eval, release-equivalent ({baseline}) | eval | eval, compiled | "
            "train step, release-equivalent | train step | peak MB, eval / train |",
            "|---|---|---|---|---|---|---|---|", *lines, "",
            "The paper's figures are its own GPU's and settings; the other columns are this machine's, the eager "
            "ones paired run by run in one process, the compiled one paired with eager in another."]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def render_report(environment: dict[str, str], outcomes: list[Outcome], budget_s: float, total_s: float,
                  baseline: str = BASELINE) -> str:
    """The Markdown report: environment, one row per part, the speed table, and the log tail of each failure."""
    passed = sum(o.status == "passed" for o in outcomes)
    lines = ["# GPU check", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in environment.items()]
    lines += [f"| result | {passed} of {len(outcomes)} parts passed in {total_s:.0f} s (budget {budget_s:.0f} s) |",
              "", "| part | result | seconds | limit | summary |", "|---|---|---|---|---|"]
    for o in outcomes:
        seconds = f"{o.seconds:.1f}" if o.status != "skipped" else "-"
        limit = f"{o.limit_s:.0f}" if o.status != "skipped" else "-"
        lines.append(f"| {o.name} | {o.status} | {seconds} | {limit} | {o.summary.replace('|', '/')} |")
    lines += speed_rows(outcomes, baseline)
    for o in outcomes:
        if o.log_tail:
            lines += ["", f"### {o.name}: last lines of its log", "", "```", *o.log_tail, "```"]
    return "\n".join(lines) + "\n"


def environment_table() -> dict[str, str]:
    """GPU, CUDA and package versions, as the report's first table."""
    import torch

    gpus = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
    versions = ", ".join(f"{name} {installed_version(name)}"
                         for name in ("torchvision", "timm", "numpy", "pillow", "yacs", "termcolor"))
    return {
        "GPU": f"{gpus} x {', '.join(names)}",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})",
        "Python": sys.version.split()[0],
        "packages": versions,
        "outside requirements.txt": ", ".join(outside_requirements()) or "none",
    }


def outside_requirements(requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """Installed packages outside requirements.txt's ranges (a GPU image's own torch or timm may be older)."""
    from packaging.requirements import Requirement

    found = []
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        version = installed_version(requirement.name)
        if version != "missing" and not requirement.specifier.contains(version, prereleases=True):
            found.append(f"{requirement.name} {version} (wants {requirement.specifier})")
    return found


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


# ---- preparation and start-up checks ---------------------------------------------------------------------------

def locked_versions(names: Sequence[str], lock_file: Path = LOCK_FILE) -> list[str]:
    """``name==version`` of each of ``names`` as the lock file pins it."""
    pins = {}
    for line in lock_file.read_text().splitlines():
        found = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if found:
            pins[found.group(1).lower()] = found.group(0)
    missing = [name for name in names if name.lower() not in pins]
    if missing:
        raise CheckError(f"{lock_file.name} pins no version of {', '.join(missing)}")
    return [pins[name.lower()] for name in names]


def wheel_command(folder: Path = WHEELS) -> list[str]:
    """pip's download of the carried packages as wheels for the GPU machine's Python (pure-Python wheels)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            DEVICE_PYTHON, "-d", str(folder), *locked_versions(CARRIED)]


def prepare(baseline: str) -> None:
    """Export the baseline's model package and download the carried wheels, here, for the GPU machine."""
    folder = benchmark.export_models(baseline, BASELINE_ROOT / baseline)
    print(f"baseline {baseline}: {folder.relative_to(ROOT)}")
    subprocess.run(wheel_command(), check=True)
    print(f"wheels: {', '.join(sorted(p.name for p in WHEELS.glob('*.whl')))}; carry .whl and .baseline")


def check_ready(baseline_folder: Path, needs_baseline: bool) -> None:
    """What the check needs before it needs CUDA: the packages, the baseline's model package, then a GPU."""
    missing = [name for name in ("yacs", "termcolor", "timm", "torchvision") if importlib.util.find_spec(name) is None]
    if missing:
        raise CheckError(f"missing Python packages {', '.join(missing)}: install the carried wheels first "
                         "(docs/testing.md, The GPU check: pip install --no-index --target /tmp/site .whl/*.whl)")
    if needs_baseline and not benchmark.is_model_folder(str(baseline_folder)):
        if shutil.which("git") is None or not (ROOT / ".git").exists():
            raise CheckError(f"{baseline_folder} holds no models/ package and there is no git history here to export "
                             "it from: run tools/gpu_check.py --prepare where the history is, and carry .baseline")
        benchmark.export_models(baseline_folder.name, baseline_folder)
    import torch

    if not torch.cuda.is_available():
        raise CheckError(f"no CUDA device is visible to torch {torch.__version__}; this check needs one: run it on "
                         "a GPU machine (docs/testing.md, The GPU check)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts together")
    parser.add_argument("--only", nargs="+", default=[], metavar="PATTERN", help="run only the parts matching these")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PATTERN", help="skip the parts matching these")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the release-equivalent model")
    parser.add_argument("--list", action="store_true", help="print the parts and their command lines, run nothing")
    parser.add_argument("--prepare", action="store_true",
                        help="export the baseline to .baseline/REV and download the carried wheels to .whl")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        prepare(args.baseline)
        return 0
    baseline_folder = BASELINE_ROOT / args.baseline
    parts = select(plan(baseline_folder), args.only, args.skip)
    if not parts:
        raise CheckError(f"no part is left to run (--only {' '.join(args.only) or '*'}, --skip "
                         f"{' '.join(args.skip) or 'nothing'}); --list shows the parts' names")
    if args.list:
        for part in parts:
            print(f"{part.name} (limit {part.limit_s:.0f} s, {part.min_gpus}+ GPU): {' '.join(part.command)}")
        return 0
    check_ready(baseline_folder, any(part.name.startswith("bench_eager") for part in parts))
    import torch

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)  # the benchmark parts write their rows here, whatever ran before them
    start = time.perf_counter()
    outcomes = run_parts(parts, args.budget, torch.cuda.device_count(), WORK / "logs")
    report = render_report(environment_table(), outcomes, args.budget, time.perf_counter() - start,
                           args.baseline)
    print(report)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report)
    return 0 if all(o.status in ("passed", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(run_tool(main))
