"""Speed and memory of the Strip-MLP variants: parameters, MACs, eval and train-step images/s, peak memory.

Each timing is the median of several timed runs after warm-up, reported with min and max. With
`--baseline REV` the model file as it was at git revision REV (or in a folder holding that revision's
`models/` package, see `export_models`) is timed side by side with the current one in the same process,
alternating run by run, so both see the same machine state;
speed-ups are claimed from such paired runs only. `--compile --eager-baseline` pairs the compiled
current model with the eager one the same way.

    python tools/benchmark.py --model strip_mlp_tiny --batch-size 32 --dtype bf16 --baseline HEAD~3

On CPU, glibc returns large buffers to the kernel after every step and page faults then dominate;
run with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184` (or a preloaded jemalloc/tcmalloc)
for steady numbers. Peak memory is measured for each implementation alone, in a fresh child process:
its peak RSS on CPU, the peak of the caching allocator on CUDA.
"""

import argparse
import atexit
import csv
import functools
import importlib
import io
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from unittest import mock

import torch
from cli import ROOT, run_tool  # puts the checkout on the path for the imports below

from engine import compile_model
from measure import count_macs, images_per_second, peak_memory_mb, time_paired
from utils import RunError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_PACKAGE = "models"
MODEL_FILE = f"{MODEL_PACKAGE}/strip_mlp.py"


@dataclass(frozen=True)
class Setting:
    """What is measured: one variant at one input size, batch, precision and memory format."""

    model: str
    img_size: int
    batch_size: int
    dtype: str
    channels_last: bool
    compile: bool
    device: str


def export_models(revision: str, folder: Path) -> Path:
    """Extract the `models/` package of git revision ``revision`` into ``folder`` (``folder/models/...``) and return
    ``folder``: a copy of the baseline that `--baseline FOLDER` reads where the history is not at hand (a machine
    that receives only the working tree)."""
    git = ["git", "-C", str(ROOT)]
    try:
        subprocess.run([*git, "cat-file", "-e", f"{revision}:{MODEL_FILE}"], check=True, capture_output=True)
        archive = subprocess.run([*git, "archive", revision, MODEL_PACKAGE], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        reason = error.stderr.decode().strip() if isinstance(error, subprocess.CalledProcessError) else error
        raise RunError(f"cannot read {MODEL_FILE} at revision {revision!r}: {reason}") from None
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def is_model_folder(baseline: str) -> bool:
    """Whether ``baseline`` names a folder holding a `models/` package (else it is a git revision)."""
    return (Path(baseline) / MODEL_FILE).is_file()


@functools.cache
def load_implementation(revision: str | None) -> ModuleType:
    """The current model module, or the model package as it was at a git revision (or in a folder of one).

    The revision's `models/` folder is extracted to a temporary folder and imported as a package
    of its own, so that the model file's relative imports (e.g. `models/layers.py`) come from the
    same revision. Its `@register_model` decorators are made inert meanwhile so that timm's
    registry keeps pointing at the current implementation.
    """
    if revision is None:
        from models import strip_mlp
        return strip_mlp
    if is_model_folder(revision):
        folder = Path(revision).resolve()
    else:
        folder = export_models(revision, Path(tempfile.mkdtemp(prefix="strip_mlp_baseline_")))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    name = "models_at_" + re.sub(r"\W", "_", revision)
    package = ModuleType(name)
    package.__path__ = [str(folder / MODEL_PACKAGE)]  # a namespace: the revision's __init__ is not run
    sys.modules[name] = package
    with mock.patch("timm.models.register_model", lambda fn: fn):
        return importlib.import_module(f"{name}.strip_mlp")


def build(module: ModuleType, setting: Setting) -> torch.nn.Module:
    if setting.model not in module.VARIANTS:
        raise RunError(f"unknown model {setting.model!r}; valid: {', '.join(module.VARIANTS)}")
    model = module.StripMLPNet(img_size=setting.img_size, **module.VARIANTS[setting.model])
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    return model.to(setting.device, memory_format=memory_format)


def giga_macs(model: torch.nn.Module, setting: Setting) -> float:
    """Multiply-accumulates of one image's forward pass, in G (FLOPs counted by torch, halved)."""
    return count_macs(model, torch.randn(1, 3, setting.img_size, setting.img_size, device=setting.device)) / 1e9


class Step:
    """One timed unit of work on a fixed random batch: an eval forward, or a full training step."""

    def __init__(self, model: torch.nn.Module, setting: Setting, train: bool) -> None:
        memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
        self.images = torch.randn(setting.batch_size, 3, setting.img_size, setting.img_size,
                                  device=setting.device).contiguous(memory_format=memory_format)
        self.targets = torch.randint(0, 1000, (setting.batch_size,), device=setting.device)
        self.model = model.train(train)
        self.forward = compile_model(model, inference_only=not train) if setting.compile else model
        self.train = train
        self.autocast = torch.autocast(torch.device(setting.device).type, dtype=DTYPES[setting.dtype],
                                       enabled=setting.dtype != "fp32")
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
        self.scaler = torch.amp.GradScaler(torch.device(setting.device).type, enabled=setting.dtype == "fp16")

    def __call__(self) -> None:
        if not self.train:
            with torch.inference_mode(), self.autocast:
                self.forward(self.images)
            return
        with self.autocast:
            loss = torch.nn.functional.cross_entropy(self.forward(self.images), self.targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def _peak_memory_child(revision: str | None, setting: Setting, train: bool, queue) -> None:
    step = Step(build(load_implementation(revision), setting), setting, train)
    for _ in range(2):
        step()
    queue.put(peak_memory_mb(torch.device(setting.device)))


def measure_peak_memory(revision: str | None, setting: Setting, train: bool) -> float:
    """Peak memory of two steps of one implementation, alone in a fresh process: the models, optimiser states
    and batches that the timing keeps alive in this process would otherwise count too."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_memory_child, args=(revision, setting, train, queue))
    child.start()
    child.join()  # the child's one number fits the queue's pipe, so it has left the child when the child ends
    if child.exitcode != 0:  # waiting on the queue would wait for ever
        raise RunError(f"measuring the peak memory of {revision or 'the current model'} failed in its child "
                       f"process (exit status {child.exitcode}; its error is above); --no-memory skips it")
    return queue.get()


@dataclass(frozen=True)
class Implementation:
    """What is timed: the model file at a git revision (None: the working tree), compiled or not."""

    label: str
    revision: str | None
    setting: Setting


def implementations(setting: Setting, baseline: str | None, eager_baseline: bool) -> list[Implementation]:
    """The current model first, then what it is compared with."""
    chosen = [Implementation("current", None, setting)]
    if baseline is not None:
        label = Path(baseline).name if is_model_folder(baseline) else baseline
        chosen.append(Implementation(label, baseline, setting))
    if eager_baseline:
        chosen.append(Implementation("current eager", None, replace(setting, compile=False)))
    return chosen


def benchmark(chosen: list[Implementation], modes: list[str], warmup: int, repeats: int,
              measure_memory: bool) -> list[dict]:
    """One result row per implementation: sizes, then eval and/or train rates, then peak memory."""
    models = [build(load_implementation(impl.revision), impl.setting) for impl in chosen]
    rows = [{"implementation": impl.label, **asdict(impl.setting),
             "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
             "gmacs": giga_macs(model, impl.setting)} for impl, model in zip(chosen, models, strict=True)]
    device = torch.device(chosen[0].setting.device)
    for mode in modes:
        train = mode == "train"
        steps = [Step(model, impl.setting, train) for impl, model in zip(chosen, models, strict=True)]
        seconds = time_paired(steps, device, warmup, repeats)
        for row, impl, run_seconds in zip(rows, chosen, seconds, strict=True):
            for statistic, value in images_per_second(impl.setting.batch_size, run_seconds).items():
                row[f"{mode}_img_s_{statistic}"] = value
            if measure_memory:
                row[f"{mode}_peak_mb"] = measure_peak_memory(impl.revision, impl.setting, train)
    return rows


def print_table(rows: list[dict]) -> None:
    columns = [key for key in rows[0] if key not in Setting.__dataclass_fields__]
    print("  ".join(f"{c:>18}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]:>18.2f}" if isinstance(row[c], float) else f"{row[c]!s:>18}" for c in columns))
    for other in rows[1:]:
        for key in rows[0]:
            if key.endswith("_img_s_median"):
                print(f"{key}: current / {other['implementation']} = {rows[0][key] / other[key]:.2f}x")


def write_rows(rows: list[dict], csv_path: Path | None, json_path: Path | None) -> None:
    """Append the rows to a CSV file (header once) and/or a JSON-lines file."""
    if csv_path is not None:
        new_file = not csv_path.exists()
        with csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
    if json_path is not None:
        with json_path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="strip_mlp_tiny", help="registered variant, e.g. strip_mlp_tiny")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast precision (fp32: off)")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    parser.add_argument("--compile", action="store_true", help="time torch.compile(model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--mode", choices=("eval", "train", "both"), default="both")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per implementation and mode")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation and mode")
    parser.add_argument("--baseline", metavar="REV",
                        help="also time the model file at this git revision (or in this folder: export_models), paired")
    parser.add_argument("--eager-baseline", action="store_true",
                        help="with --compile: also time the current model without torch.compile, paired")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--csv", type=Path, help="append result rows to this CSV file")
    parser.add_argument("--json", type=Path, help="append result rows to this JSON-lines file")
    args = parser.parse_args(argv)
    if args.img_size % 32 != 0:
        parser.error(f"--img-size {args.img_size} is not divisible by 32")
    if args.eager_baseline and not args.compile:
        parser.error("--eager-baseline compares against --compile; add --compile")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available; use --device cpu")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setting = Setting(args.model, args.img_size, args.batch_size, args.dtype, args.channels_last, args.compile,
                      args.device)
    modes = ["eval", "train"] if args.mode == "both" else [args.mode]
    chosen = implementations(setting, args.baseline, args.eager_baseline)
    rows = benchmark(chosen, modes, args.warmup, args.repeats, not args.no_memory)
    print(f"{setting}")
    print_table(rows)
    write_rows(rows, args.csv, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
