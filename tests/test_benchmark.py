"""tools/benchmark.py end to end on a tiny setting: every option runs and the rows say what was measured."""

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm

import models  # noqa: F401  (registers the variants with timm)
from utils import RunError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import benchmark  # noqa: E402  (tools/ is a folder of scripts, not a package)

SMALL = ["--model", "strip_mlp_tiny_light", "--img-size", "64", "--batch-size", "2", "--warmup", "1", "--repeats", "2"]


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), *SMALL, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow  # both modes, each measured again in a fresh process for its peak memory
def test_both_modes_with_memory_write_csv_and_json(tmp_path: Path) -> None:
    result = run_benchmark("--csv", str(tmp_path / "rows.csv"), "--json", str(tmp_path / "rows.jsonl"))
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])
    assert row["implementation"] == "current" and row["model"] == "strip_mlp_tiny_light"
    model = timm.create_model("strip_mlp_tiny_light", img_size=64)
    assert row["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    for mode in ("eval", "train"):
        assert 0 < row[f"{mode}_img_s_min"] <= row[f"{mode}_img_s_median"] <= row[f"{mode}_img_s_max"]
        assert row[f"{mode}_peak_mb"] > 100
    with (tmp_path / "rows.csv").open() as handle:
        assert list(csv.DictReader(handle))[0]["train_img_s_median"] == str(row["train_img_s_median"])


@pytest.mark.parametrize("options", [
    ["--dtype", "bf16"],  # the fast subset's run of the tool end to end
    pytest.param(["--dtype", "fp16", "--mode", "train"], marks=pytest.mark.slow),
    pytest.param(["--channels-last"], marks=pytest.mark.slow),
])
def test_precision_and_memory_format_options(options: list[str], tmp_path: Path) -> None:
    result = run_benchmark(*options, "--mode", "eval", "--no-memory", "--json", str(tmp_path / "rows.jsonl"))
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "rows.jsonl").read_text())
    assert row["eval_img_s_median"] > 0
    assert row["dtype"] == (options[1] if options[0] == "--dtype" else "fp32")
    assert row["channels_last"] == ("--channels-last" in options)


@pytest.mark.slow  # test_a_baseline_folder_stands_in_for_the_git_history pairs the implementations in-process
def test_paired_baseline_revision_is_timed_beside_the_current_model(tmp_path: Path) -> None:
    result = run_benchmark("--baseline", "HEAD", "--mode", "eval", "--no-memory", "--json", str(tmp_path / "r.jsonl"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [row["implementation"] for row in rows] == ["current", "HEAD"]
    assert rows[0]["gmacs"] == pytest.approx(rows[1]["gmacs"])
    assert "eval_img_s_median: current / HEAD = " in result.stdout


@pytest.mark.slow
def test_compiled_model_is_timed_beside_the_eager_one(tmp_path: Path) -> None:
    result = run_benchmark("--compile", "--eager-baseline", "--mode", "eval", "--no-memory",
                           "--json", str(tmp_path / "rows.jsonl"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(row["implementation"], row["compile"]) for row in rows] == [("current", True), ("current eager", False)]
    assert "eval_img_s_median: current / current eager = " in result.stdout


@pytest.mark.parametrize(("options", "status", "message"), [
    (["--img-size", "100"], 2, "--img-size 100 is not divisible by 32"),  # argparse's usage errors
    (["--model", "strip_mlp_huge"], 1, "unknown model 'strip_mlp_huge'; valid: strip_mlp_tiny_light"),
    (["--baseline", "no-such-revision"], 1, "cannot read models/strip_mlp.py at revision 'no-such-revision'"),
    (["--eager-baseline"], 2, "--eager-baseline compares against --compile; add --compile"),
])
def test_bad_options_fail_with_one_line(options: list[str], status: int, message: str) -> None:
    result = run_benchmark(*options, "--no-memory")
    assert result.returncode == status
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def fake_memory_child(monkeypatch, exitcode: int, result: float | None) -> list[tuple]:
    """Stand in for multiprocessing's spawn context: a child that exits with ``exitcode`` having queued ``result``
    (None: nothing, as a child that failed). Returns the (target, args) of each child started."""
    started = []

    class Queue:
        def get(self) -> float:
            if result is None:
                raise AssertionError("waited for the result of a child that failed")
            return result

    class Process:
        def __init__(self, target, args) -> None:
            self.exitcode = exitcode
            started.append((target, args))

        def start(self) -> None:
            pass

        def join(self) -> None:
            pass

    context = SimpleNamespace(Queue=Queue, Process=Process)
    monkeypatch.setattr(benchmark.multiprocessing, "get_context", lambda method: context)
    return started


def test_peak_memory_is_measured_alone_in_a_fresh_process_on_every_device(monkeypatch) -> None:
    """On CUDA too: the timed models, optimiser states and batches of this process must not count."""
    started = fake_memory_child(monkeypatch, exitcode=0, result=123.0)
    setting = benchmark.Setting("strip_mlp_tiny", 224, 8, "bf16", False, False, "cuda:0")
    assert benchmark.measure_peak_memory("HEAD", setting, train=True) == 123.0
    assert started[0][0] is benchmark._peak_memory_child and started[0][1][:3] == ("HEAD", setting, True)


def test_a_failed_memory_measurement_is_an_error_not_a_wait_for_ever(monkeypatch) -> None:
    """The child may fail (on CUDA: out of memory beside the timed models); then nothing comes on its queue."""
    fake_memory_child(monkeypatch, exitcode=1, result=None)
    setting = benchmark.Setting("strip_mlp_tiny", 224, 8, "bf16", False, False, "cuda:0")
    with pytest.raises(RunError, match=r"^measuring the peak memory of HEAD failed .*exit status 1"):
        benchmark.measure_peak_memory("HEAD", setting, train=True)


def test_a_baseline_folder_stands_in_for_the_git_history(tmp_path: Path) -> None:
    """A GPU machine gets the working tree without .git: the revision's models/ package, exported here, is used."""
    folder = benchmark.export_models("55ee36f", tmp_path / "55ee36f")
    assert benchmark.is_model_folder(str(folder)) and not benchmark.is_model_folder(str(tmp_path))
    setting = benchmark.Setting("strip_mlp_tiny_light", 64, 2, "fp32", False, False, "cpu")
    current, baseline = benchmark.implementations(setting, str(folder), eager_baseline=False)
    assert (current.label, baseline.label, baseline.revision) == ("current", "55ee36f", str(folder))
    module = benchmark.load_implementation(str(folder))
    assert Path(module.__file__).parent == folder / "models"  # the copy, not the current package
    sizes = [sum(p.numel() for p in benchmark.build(m, setting).parameters())
             for m in (module, benchmark.load_implementation(None))]
    assert sizes[0] == sizes[1]
