"""tools/gpu_check.py as far as a CPU allows: its parts' command lines, time limits, budget and summaries, the report,
its preparation, and the one line it stops with where no CUDA device is."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import sample_batch
from torch import nn

from config import parse_option
from distributed import DistEnv
from engine import StepSettings, throughput, validate
from models import StripMLPNet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import benchmark  # noqa: E402  (tools/ is a folder of scripts, not a package)
import gpu_check  # noqa: E402

PY = sys.executable


def recording_logger() -> tuple[logging.Logger, list[str]]:
    messages: list[str] = []
    logger = logging.Logger("gpu-check-test")
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    return logger, messages


def cpu_settings() -> StepSettings:
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return StepSettings(env=env, amp_enabled=False, amp_dtype=torch.bfloat16, channels_last=False,
                        accumulation_steps=1, clip_grad=0.0, print_freq=1, epochs=1)


def by_name(parts: list[gpu_check.Part]) -> dict[str, gpu_check.Part]:
    return {part.name: part for part in parts}


def test_without_cuda_it_stops_with_one_line(tmp_path: Path) -> None:
    """Hidden GPUs too: the check gets as far as needing CUDA, then says so in one line and writes no report."""
    report = tmp_path / "report.md"
    result = subprocess.run([PY, "tools/gpu_check.py", "--skip", "bench_*", "--report", str(report)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: no CUDA device is visible to torch {torch.__version__}; this check needs one: run it on a GPU "
        "machine (docs/testing.md, The GPU check)"]
    assert result.stdout == "" and not report.exists()


def test_before_cuda_it_exports_the_baseline_from_git_or_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = tmp_path / gpu_check.BASELINE
    with pytest.raises(gpu_check.CheckError, match="^no CUDA device"):
        gpu_check.check_ready(folder, needs_baseline=True)
    assert benchmark.is_model_folder(str(folder))  # exported before CUDA was asked for
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # a copy of the working tree without .git
    with pytest.raises(gpu_check.CheckError, match=r"other holds no models/ package .* --prepare .* carry .baseline$"):
        gpu_check.check_ready(tmp_path / "other", needs_baseline=True)


def test_missing_packages_are_named_with_the_fix(monkeypatch) -> None:
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None if name == "yacs" else real(name))
    with pytest.raises(gpu_check.CheckError, match=r"^missing Python packages yacs: install the carried wheels first"):
        gpu_check.check_ready(Path("unused"), needs_baseline=False)


def test_parts_run_under_their_limits_and_the_budget(tmp_path: Path, monkeypatch) -> None:
    def fails(output: str) -> str:
        raise gpu_check.PartFailed(f"wrong result after {output.strip()!r}")

    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; " \
                 f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    parts = [
        gpu_check.Part("ok", (PY, "-c", "print('first'); print('done in style')"), 30),
        gpu_check.Part("slow", (PY, "-c", grandchild), 3),
        gpu_check.Part("bad", (PY, "-c", "import sys; print('boom'); sys.exit(3)"), 30),
        gpu_check.Part("wrong", (PY, "-c", "print('x')"), 30, summarize=fails),
        gpu_check.Part("pair", (PY, "-c", "pass"), 30, min_gpus=2),
    ]
    seen: list[str] = []
    outcomes = gpu_check.run_parts(parts, budget_s=200, gpus=1, log_folder=tmp_path / "logs", echo=seen.append)
    ok, slow, bad, wrong, pair = outcomes
    assert (ok.status, ok.summary, ok.limit_s, ok.log_tail) == ("passed", "done in style", 30, [])
    assert 0 < ok.seconds < 30
    assert (slow.status, slow.summary) == ("timed out", "stopped at its limit of 3 s") and 3 <= slow.seconds < 20
    state = Path(f"/proc/{pid_file.read_text()}/status")  # the whole process group was killed at the limit
    assert not state.exists() or "zombie" in state.read_text()
    assert (bad.status, bad.summary, bad.log_tail) == ("failed", "exit status 3: boom", ["boom"])
    assert (wrong.status, wrong.summary) == ("failed", "wrong result after 'x'")
    assert (pair.status, pair.summary, pair.seconds) == ("skipped", "needs 2 GPUs, 1 visible", 0.0)
    assert (tmp_path / "logs" / "bad.log").read_text() == "boom\n"
    assert seen[0] == f"[gpu_check] ok (limit 30 s): {PY} -c print('first'); print('done in style')"
    assert len(seen) == 9  # a start and an end line for each part run, one line for the skipped one

    monkeypatch.setattr(gpu_check, "MIN_PART_S", 4.0)
    first, second = gpu_check.run_parts([gpu_check.Part("sleeps", (PY, "-c", "import time; time.sleep(3)"), 30),
                                         gpu_check.Part("late", (PY, "-c", "pass"), 30)], budget_s=6.5, gpus=1,
                                        log_folder=tmp_path / "logs", echo=seen.append)
    assert first.status == "passed" and 6 < first.limit_s <= 6.5  # the smaller of its limit and what is left
    assert second.status == "skipped" and second.summary.endswith("s left of the 6 s budget")


def test_the_plan_checks_what_the_issue_lists_with_command_lines_that_parse(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    parts = gpu_check.plan(ROOT / ".baseline" / "55ee36f")
    names = [part.name for part in parts]
    assert names[:7] == ["tests", "train_bf16", "train_fp16", "eval", "ddp_train", "ddp_eval", "throughput"]
    assert names[7:] == [*(f"bench_eager_{m}" for m in gpu_check.VARIANTS), "train_compile",
                         *(f"bench_compiled_{m}" for m in ("strip_mlp_tiny", "strip_mlp_tiny_light", "strip_mlp_small",
                                                           "strip_mlp_base"))]
    part = by_name(parts)
    assert part["tests"].command[1:] == ("-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests")
    configs = {name: parse_option(list(part[name].command[2:]))[1]
               for name in ("train_bf16", "train_fp16", "train_compile", "eval", "throughput")}
    for name, config in configs.items():
        assert config.DEVICE == "cuda" and config.AMP.ENABLE and config.MODEL.NAME == "strip_mlp_demo", name
        assert Path(config.OUTPUT) == gpu_check.DEMO_RUNS / name.removeprefix("train_"), name
    assert [configs[n].AMP.DTYPE for n in ("train_bf16", "train_fp16", "train_compile")] == \
        ["bfloat16", "float16", "bfloat16"]
    assert all(configs[n].TRAIN.EPOCHS == 2 for n in ("train_bf16", "train_fp16", "train_compile"))
    assert configs["train_compile"].COMPILE and configs["train_fp16"].CHANNELS_LAST
    assert configs["eval"].EVAL_MODE and configs["eval"].MODEL.RESUME == str(gpu_check.DEMO_RUNS / "bf16" / "best.pth")
    assert configs["throughput"].THROUGHPUT_MODE and configs["throughput"].DATA.BATCH_SIZE == 128

    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    for name in ("ddp_train", "ddp_eval"):
        assert part[name].min_gpus == 2 and part[name].command[1:5] == torchrun
    ddp = parse_option(list(part["ddp_train"].command[6:]))[1]
    assert ddp.TRAIN.SYNC_BN and ddp.DATA.BATCH_SIZE == 32 and ddp.TRAIN.EPOCHS == 2 and ddp.AMP.DTYPE == "bfloat16"

    for name in names:
        if name.startswith("bench_"):
            args = benchmark.parse_args(list(part[name].command[2:]))
            assert (args.img_size, args.batch_size, args.dtype, args.channels_last) == (224, 128, "bf16", True), name
            assert args.model == name.split("_", 2)[2] and args.json == gpu_check.bench_json(name)
            eager = name.startswith("bench_eager")
            assert args.baseline == (str(ROOT / ".baseline" / "55ee36f") if eager else None)
            assert (args.mode, args.compile, args.eager_baseline, args.no_memory) == \
                (("both", False, False, False) if eager else ("eval", True, True, True))


def test_parts_are_chosen_by_name_patterns(capsys) -> None:
    parts = gpu_check.plan(Path("baseline"))
    assert [p.name for p in gpu_check.select(parts, only=["tests", "train_*"], skip=["*compile*"])] == \
        ["tests", "train_bf16", "train_fp16"]
    assert len(gpu_check.select(parts, only=[], skip=["bench_*"])) == len(parts) - 8
    assert gpu_check.main(["--list", "--only", "eval"]) == 0
    assert capsys.readouterr().out.startswith("eval (limit 40 s, 1+ GPU): ")


def write_metrics(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_summaries_read_what_the_runs_write(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gpu_check, "DEMO_RUNS", tmp_path)
    rows = [{"epoch": e, "acc1": acc, "train_loss": loss, "skipped_updates": skipped, "epoch_time": 3.0}
            for e, acc, loss, skipped in ((0, 90.0, 0.9, 2), (1, 97.25, 0.512, 1))]
    write_metrics(tmp_path / "fp16", rows)
    assert gpu_check.summarize_training("fp16", 2)("") == \
        "top-1 97.25% after 2 epochs, train loss 0.512, 3 skipped updates, 3.0 s per epoch"
    with pytest.raises(gpu_check.PartFailed, match="2 epochs in metrics.jsonl, expected 3"):
        gpu_check.summarize_training("fp16", 3)("")
    with pytest.raises(gpu_check.PartFailed, match="bf16/metrics.jsonl was not written"):
        gpu_check.summarize_training("bf16", 2)("")

    # The console lines of a real validation and throughput measurement, as main.py prints them.
    logger, messages = recording_logger()
    logits = torch.eye(4).repeat(100, 1)[:364] * 5
    targets = logits.argmax(dim=1)
    targets[:3] = (targets[:3] + 1) % 4  # 361 of 364 right: 99.176%
    validate(nn.Identity(), [sample_batch(logits, targets)], cpu_settings(), logger)
    throughput(StripMLPNet(img_size=32, num_classes=4, embed_dim=8, layers=(1, 1, 1, 1)), torch.randn(2, 3, 32, 32),
               cpu_settings(), logger, warmup=1, repeats=1)
    output = "\n".join(f"\x1b[32m[2026-01-01 00:00:00 strip_mlp_demo]\x1b[0m {m}" for m in messages)
    write_metrics(tmp_path / "bf16", [{**rows[0], "acc1": 98.901}, {**rows[1], "acc1": 99.176}])
    assert gpu_check.summarize_evaluation("bf16", "1 process")(output) == \
        "1 process top-1 99.176% over 364 images; training measured 99.176%"
    write_metrics(tmp_path / "moved", [{**rows[1], "acc1": 99.176 - 2 * 100 / 364}])
    with pytest.raises(gpu_check.PartFailed, match=r"differs from the 98.627% its training measured"):
        gpu_check.summarize_evaluation("moved", "1 process")(output)
    assert gpu_check.summarize_throughput(output).endswith(" images/s at batch 2 (demo model, 32 px)")

    write_metrics(tmp_path / "ddp", [rows[0], {**rows[1], "acc1": 99.0, "train_loss": 0.5}])
    (tmp_path / "bf16" / "metrics.jsonl").write_text(json.dumps({**rows[1], "acc1": 98.5}) + "\n")
    assert gpu_check.summarize_ddp_training("").startswith("2 processes: top-1 99.00%, train loss 0.5000; one process: "
                                                           "98.50%")
    (tmp_path / "bf16" / "metrics.jsonl").write_text(json.dumps({**rows[1], "acc1": 97.5}) + "\n")
    with pytest.raises(gpu_check.PartFailed, match="2-process top-1 99.00% against 97.50% in one process"):
        gpu_check.summarize_ddp_training("")


def bench_row(implementation: str, eval_rate: float, train_rate: float | None, memory: bool) -> dict:
    row = {"implementation": implementation, "model": "strip_mlp_tiny", "eval_img_s_median": eval_rate}
    if train_rate is not None:
        row["train_img_s_median"] = train_rate
    if memory:
        row.update(eval_peak_mb=1234.4, train_peak_mb=9876.6)
    return row


def test_the_report_gives_each_part_and_the_speeds_beside_the_papers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(gpu_check, "WORK", tmp_path)
    eager, compiled = "bench_eager_strip_mlp_tiny", "bench_compiled_strip_mlp_tiny"
    gpu_check.bench_json(eager).write_text("".join(json.dumps(r) + "\n" for r in (
        bench_row("current", 2500.4, 800.0, True), bench_row("55ee36f", 1800.0, 600.2, True))))
    gpu_check.bench_json(compiled).write_text("".join(json.dumps(r) + "\n" for r in (
        bench_row("current", 3100.0, None, False), bench_row("current eager", 2490.0, None, False))))
    assert gpu_check.summarize_benchmark(compiled)("") == "current: eval 3100 img/s; current eager: eval 2490 img/s"
    outcomes = [
        gpu_check.Outcome("tests", "passed", 61.25, 150, "12 passed in 58.1s"),
        gpu_check.Outcome("train_fp16", "failed", 9.0, 60, "exit status 1: error: a | b", ["Traceback", "boom"]),
        gpu_check.Outcome("ddp_train", "skipped", summary="needs 2 GPUs, 1 visible"),
        gpu_check.Outcome(eager, "passed", 30.0, 60, "..."),
        gpu_check.Outcome(compiled, "passed", 50.0, 90, "..."),
        gpu_check.Outcome("bench_eager_strip_mlp_base", "timed out", 60.0, 60, "stopped at its limit of 60 s"),
    ]
    report = gpu_check.render_report({"GPU": "1 x NVIDIA H100 80GB HBM3"}, outcomes, budget_s=345, total_s=210.4)
    lines = report.splitlines()
    assert lines[:6] == ["# GPU check", "", "| | |", "|---|---|", "| GPU | 1 x NVIDIA H100 80GB HBM3 |",
                         "| result | 3 of 6 parts passed in 210 s (budget 345 s) |"]
    assert "| tests | passed | 61.2 | 150 | 12 passed in 58.1s |" in lines
    assert "| train_fp16 | failed | 9.0 | 60 | exit status 1: error: a / b |" in lines
    assert "| ddp_train | skipped | - | - | needs 2 GPUs, 1 visible |" in lines
    assert "| `strip_mlp_tiny` | 597 | 1800 | 2500 | 3100 | 600 | 800 | 1234 / 9877 |" in lines
    assert not any(line.startswith("| `strip_mlp_base`") for line in lines)  # its benchmark did not finish
    assert lines[-6:] == ["### train_fp16: last lines of its log", "", "```", "Traceback", "boom", "```"]


def test_prepare_downloads_the_locked_versions_for_the_gpu_machines_python(tmp_path: Path) -> None:
    command = gpu_check.wheel_command(tmp_path)
    pins = gpu_check.locked_versions(["yacs", "termcolor"])
    assert [pin.split("==")[0] for pin in pins] == ["yacs", "termcolor"]
    assert command[1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                           "-d", str(tmp_path), *pins]
    lock = tmp_path / "lock.txt"
    lock.write_text("# pins\nyacs==0.1.8\n")
    with pytest.raises(gpu_check.CheckError, match="^lock.txt pins no version of termcolor$"):
        gpu_check.locked_versions(["yacs", "termcolor"], lock)


def test_packages_outside_requirements_txt_are_named(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"# ranges\ntorch>=2.11\ntimm>=99.0  # newer than any\nnot-installed-here>=1.0\n"
                            f"pillow<{gpu_check.installed_version('pillow')}\n")
    assert gpu_check.outside_requirements(requirements) == [
        f"timm {gpu_check.installed_version('timm')} (wants >=99.0)",
        f"pillow {gpu_check.installed_version('pillow')} (wants <{gpu_check.installed_version('pillow')})"]
    assert gpu_check.outside_requirements() == []  # this environment satisfies the real file
