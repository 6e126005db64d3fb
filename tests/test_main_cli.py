"""main.py end to end on generated images: train, evaluate, resume exactly, survive SIGKILL, refuse bad input."""

import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from run_helpers import REPO, launch, load_weights, plain, release_config, run_dir, write_config, write_image_folder

import checkpoint
import engine
import main
from checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint
from config import config_from_text, load_config
from data import build_loader
from models import StripMLPNet

sys.path.insert(0, str(REPO / "tools"))
import resize_eval  # noqa: E402  (tools/ is a folder of scripts, not a package)

# Resume runs: EMA, accumulation (6 micro-batches -> 3 updates per epoch), mixup/cutmix, RandAugment and drop
# path all on, so every source of randomness and every piece of saved state takes part.
RESUME_EXTRA = {"TRAIN": {"EPOCHS": 3, "ACCUMULATION_STEPS": 2, "EMA": {"ENABLE": True, "DECAY": 0.9}}}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def trained(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a 2-epoch in-process run."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "config.yaml", images, root / "out")
    assert main.main(["--cfg", str(config)]) == 0
    return run_dir(root / "out")


def test_train_two_epochs_writes_checkpoints_and_logs(trained: Path) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {"ckpt_epoch_0.pth", "ckpt_epoch_1.pth", "latest.pth", "best.pth", "config.yaml", "log_rank0.txt",
            "metrics.jsonl"} <= names
    assert not any(name.endswith(".tmp") for name in names)
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert {"train_loss", "val_loss", "acc1", "acc5", "lr", "epoch_time", "grad_norm"} <= set(rows[0])
    checkpoint = load_checkpoint_file(trained / "latest.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 12
    assert "TRAIN:" in checkpoint["config"] and checkpoint["max_accuracy"] == max(r["acc1"] for r in rows)
    log = (trained / "log_rank0.txt").read_text()
    assert "learning rates (none scaling, x1): base 0.001, warm-up 1e-05, min 1e-05" in log
    assert "eta" in log and "grad_norm" in log and "mem" in log


def test_eval_of_a_checkpoint_prints_the_release_summary(trained: Path, capsys) -> None:
    config = trained / "config.yaml"
    assert main.main(["--cfg", str(config), "--eval", "--resume", str(trained / "latest.pth"), "--tag", "eval"]) == 0
    last = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert f" * Acc@1 {last['acc1']:.3f} Acc@5 {last['acc5']:.3f}" in capsys.readouterr().out


def test_eval_in_the_training_runs_folder_leaves_its_files_alone(trained: Path, capsys) -> None:
    """The README's own command evaluates into the run's folder; its config and logs go beside its reports."""
    def files() -> dict[str, bytes]:
        return {str(p.relative_to(trained)): p.read_bytes() for p in trained.rglob("*")
                if p.is_file() and "eval" not in p.relative_to(trained).parts}

    before = files()
    config = trained.parents[2] / "config.yaml"  # the command that trained it: same output folder
    assert main.main(["--cfg", str(config), "--eval", "--resume", str(trained / "latest.pth"), "--opts",
                      "DATA.BATCH_SIZE", "2"]) == 0
    assert files() == before
    assert load_config(str(trained / "eval" / "config.yaml")).DATA.BATCH_SIZE == 2
    assert " * Acc@1" in (trained / "eval" / "log_rank0.txt").read_text()


@pytest.mark.slow
def test_compiled_eval_folds_the_loaded_weights_and_gives_the_same_result(trained: Path, capsys) -> None:
    """An eval-only run compiles with inductor's freezing, which bakes in the weights present at the
    first call: they must be the checkpoint's, so the summary equals the eager evaluation's."""
    config = str(trained / "config.yaml")
    resume = ["--resume", str(trained / "latest.pth")]
    summaries = []
    for tag, opts in (("eager", []), ("compiled", ["--opts", "COMPILE", "True"])):
        assert main.main(["--cfg", config, "--eval", *resume, "--tag", tag, *opts]) == 0
        summaries.append([line for line in capsys.readouterr().out.splitlines() if " * Acc@1 " in line][-1])
    assert torch._inductor.config.freezing is False  # freezing is scoped to the one compiled model
    assert summaries[0].split(" * ")[1] == summaries[1].split(" * ")[1]


def test_eval_without_a_checkpoint_is_an_error(trained: Path, capsys) -> None:
    assert main.main(["--cfg", str(trained / "config.yaml"), "--eval", "--tag", "eval2"]) == 1
    assert "--eval needs weights to evaluate" in capsys.readouterr().err


def test_throughput_mode(trained: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(main, "throughput", functools.partial(engine.throughput, warmup=2, repeats=3))
    assert main.main(["--cfg", str(trained / "config.yaml"), "--throughput", "--tag", "speed"]) == 0
    assert "images/s" in capsys.readouterr().out


def test_existing_checkpoints_are_never_overwritten_by_a_fresh_run(trained: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in trained.glob("*.pth")}
    config = trained / "config.yaml"  # its OUTPUT is already OUTPUT/NAME/TAG: --output names the root again
    output_root = trained.parents[1]
    code = main.main(["--cfg", str(config), "--output", str(output_root), "--tag", "run",
                      "--opts", "TRAIN.AUTO_RESUME", "False"])
    assert code == 1
    assert "already holds checkpoints and TRAIN.AUTO_RESUME is off" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in trained.glob("*.pth")} == before


def test_resume_from_epoch_one_equals_two_epochs_straight(trained: Path, images: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out")
    code = main.main(["--cfg", str(config), "--resume", str(trained / "ckpt_epoch_0.pth")])
    assert code == 0
    resumed = load_checkpoint_file(run_dir(tmp_path / "out") / "latest.pth")
    straight = load_checkpoint_file(trained / "latest.pth")
    assert resumed["epoch"] == straight["epoch"] == 1
    for name, weight in straight["model"].items():
        assert torch.equal(weight, resumed["model"][name]), name
    for i, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][i][key]), (i, key)
    assert resumed["optimizer"]["param_groups"][0]["lr"] == straight["optimizer"]["param_groups"][0]["lr"]
    assert resumed["global_step"] == straight["global_step"]


def test_resume_with_loader_workers_replays_exactly(images: Path, tmp_path: Path) -> None:
    """Worker processes draw their seeds from the re-seeded main process, so they replay too (workers that
    persist across epochs keep their first seeds instead, hence the default PERSISTENT_WORKERS False)."""
    extra = {"DATA": {"NUM_WORKERS": 2}}
    straight = write_config(tmp_path / "straight.yaml", images, tmp_path / "straight", extra)
    assert main.main(["--cfg", str(straight)]) == 0
    resumed = write_config(tmp_path / "resumed.yaml", images, tmp_path / "resumed", extra)
    assert main.main(["--cfg", str(resumed), "--resume", str(run_dir(tmp_path / "straight") / "ckpt_epoch_0.pth")]) == 0
    a = load_weights(run_dir(tmp_path / "straight") / "latest.pth")
    b = load_weights(run_dir(tmp_path / "resumed") / "latest.pth")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_auto_resume_skips_a_truncated_latest_and_refuses_when_nothing_loads(trained: Path, tmp_path: Path,
                                                                           capsys) -> None:
    copy = tmp_path / "out" / "tiny" / "run"
    copy.mkdir(parents=True)
    for path in trained.glob("*.pth"):
        copy.joinpath(path.name).write_bytes(path.read_bytes())
    latest = copy / "latest.pth"
    latest.write_bytes(latest.read_bytes()[:1000])
    config = write_config(tmp_path / "config.yaml", trained.parents[2] / "unused", tmp_path / "out")
    args = ["--cfg", str(config), "--data-path", str(Path(load_config(str(trained / "config.yaml")).DATA.DATA_PATH))]
    assert main.main(args) == 0
    out = capsys.readouterr().out
    assert "auto-resume skips latest.pth" in out and "resumed from" in out and "ckpt_epoch_1.pth: epoch 1" in out
    for path in copy.glob("ckpt_epoch_*.pth"):
        path.write_bytes(path.read_bytes()[:1000])
    latest.write_bytes(latest.read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in copy.glob("*.pth")}
    assert main.main(args) == 1
    assert "holds checkpoints but none loads" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in copy.glob("*.pth")} == before  # nothing overwritten or deleted


def test_nan_loss_stops_with_the_step_and_keeps_earlier_checkpoints(images: Path, tmp_path: Path, capsys) -> None:
    # A step schedule that multiplies the rate by 1e30 after epoch 0: epoch 0 trains, epoch 1 explodes.
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {"TRAIN": {
        "WARMUP_EPOCHS": 0, "LR_SCHEDULER": {"NAME": "step", "DECAY_EPOCHS": 1, "DECAY_RATE": 1e30}}})
    assert main.main(["--cfg", str(config)]) == 1
    assert "ERROR loss is nan at epoch 1 step" in capsys.readouterr().err.replace("\x1b[31m", "").replace("\x1b[0m", "")
    out = run_dir(tmp_path / "out")
    assert load_checkpoint_file(out / "latest.pth")["epoch"] == 0
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "ckpt_epoch_0.pth", "latest.pth"]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_keeps_earlier_checkpoints(images: Path, tmp_path: Path,
                                                                              monkeypatch, capsys) -> None:
    """The disk fills during epoch 1's first checkpoint write (the file's writes fail with ENOSPC, as the kernel's
    do); no real full disk is needed."""
    real_open = open

    def open_on_a_full_disk(name, mode="r", *args, **kwargs):
        file = real_open(name, mode, *args, **kwargs)
        if Path(name).name.startswith("ckpt_epoch_1.pth."):
            def fail(data) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            file.write = fail
        return file

    monkeypatch.setattr(checkpoint, "open", open_on_a_full_disk, raising=False)
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out")
    assert main.main(["--cfg", str(config)]) == 1
    out = run_dir(tmp_path / "out")
    errors = [line for line in plain(capsys.readouterr().err).splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1, errors
    assert f"ERROR cannot write checkpoint {out / 'ckpt_epoch_1.pth'}: OSError: [Errno 28] No space left" in errors[0]
    assert load_checkpoint_file(out / "latest.pth")["epoch"] == 0
    assert sorted(p.name for p in out.iterdir() if ".pth" in p.name) == ["best.pth", "ckpt_epoch_0.pth", "latest.pth"]


def test_an_output_under_a_file_is_one_line(trained: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a_file").write_text("")
    assert main.main(["--cfg", str(trained / "config.yaml"), "--output", str(tmp_path / "a_file" / "x")]) == 1
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'a_file' / 'x' / 'tiny' / 'run'}: " \
                                      f"{tmp_path / 'a_file'} is a file, not a folder; give another path\n"


def test_a_checkpoint_of_other_class_names_stops_eval_resume_and_tools(trained: Path, images: Path, tmp_path: Path,
                                                                       capsys) -> None:
    renamed = shutil.copytree(images, tmp_path / "renamed")
    for split in ("train", "val"):  # two class folders renamed: sorted, the labels of both move
        (renamed / split / "class_0").rename(renamed / split / "zebra")
        (renamed / split / "class_2").rename(renamed / split / "aardvark")
    checkpoint = str(trained / "latest.pth")
    refusal = (f"{checkpoint} was trained on other classes than the data holds (2 of 3 labels differ; label 0: "
               "'class_0' in the checkpoint, 'aardvark' in the data; label 2: 'class_2' in the checkpoint, 'zebra' "
               "in the data); give the data it was trained on (DATA.DATA_PATH), or start a new run from its weights "
               "with --pretrained")
    common = ["--cfg", str(trained / "config.yaml"), "--resume", checkpoint, "--data-path", str(renamed)]
    assert main.main([*common, "--eval", "--output", str(tmp_path / "eval")]) == 1
    assert refusal in capsys.readouterr().err
    assert main.main([*common, "--output", str(tmp_path / "resumed"), "--opts", "TRAIN.EPOCHS", "3"]) == 1
    assert refusal in capsys.readouterr().err
    assert not list((tmp_path / "resumed").rglob("*.pth"))
    with pytest.raises(CheckpointError) as refused:
        resize_eval.main(["--checkpoint", checkpoint, "--sizes", "64", "--opts", "DATA.DATA_PATH", str(renamed)])
    assert str(refused.value) == refusal


# ---------------------------------------------------------------------------------------------------------------
# Release-format checkpoints and refusals


@pytest.fixture(scope="module")
def golden_setup(tmp_path_factory: pytest.TempPathFactory, golden: dict) -> tuple[Path, Path, dict]:
    """A release-format checkpoint of the golden model, 10-class 64 px images and a config for both."""
    root = tmp_path_factory.mktemp("golden")
    data = write_image_folder(root / "images", classes=10, train_per_class=1, val_per_class=2, size=64)
    save_checkpoint({"model": golden["state_dict"], "epoch": 299}, root / "release.pth")
    cfg = golden["config"]
    config = write_config(root / "config.yaml", data, root / "out", {
        "DATA": {"IMG_SIZE": cfg["img_size"]},
        "MODEL": {"NUM_CLASSES": cfg["num_classes"],
                  "STRIP_MLP": {"EMBED_DIM": cfg["embed_dim"], "LAYERS": cfg["layers"], "ALPHA": cfg["alpha"]}},
    })
    return config, root, golden


def test_release_checkpoint_evaluates(golden_setup, golden_model: StripMLPNet, capsys) -> None:
    config_path, root, golden = golden_setup
    assert main.main(["--cfg", str(config_path), "--eval", "--resume", str(root / "release.pth")]) == 0
    summary = [line for line in capsys.readouterr().out.splitlines() if " * Acc@1 " in line][-1]
    # The same numbers computed directly with the golden weights on the same validation images.
    config = load_config(str(config_path))
    val_loader = build_loader(config, train=False).loader_val
    with torch.no_grad():
        pairs = [(golden_model(batch.image), batch.target) for batch in val_loader]
    correct1 = sum((out.argmax(1) == y).sum().item() for out, y in pairs)
    correct5 = sum((out.topk(5, 1).indices == y[:, None]).sum().item() for out, y in pairs)
    assert summary.endswith(f" * Acc@1 {100 * correct1 / 20:.3f} Acc@5 {100 * correct5 / 20:.3f}")


def test_mismatched_checkpoint_is_refused_with_names_and_shapes(golden_setup, capsys) -> None:
    config_path, root, _ = golden_setup
    images = write_image_folder(root / "three", classes=3, train_per_class=2, val_per_class=1, size=64)
    code = main.main(["--cfg", str(config_path), "--eval", "--resume", str(root / "release.pth"), "--data-path",
                      str(images), "--opts", "MODEL.NUM_CLASSES", "3"])
    assert code == 1
    assert "head.weight: checkpoint (10, 320) vs model (3, 320)" in capsys.readouterr().err


def test_malicious_checkpoint_is_refused_and_its_code_does_not_run(golden_setup, tmp_path: Path, capsys) -> None:
    config_path, _, _ = golden_setup
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    torch.save({"model": Evil()}, evil)
    assert main.main(["--cfg", str(config_path), "--eval", "--resume", str(evil)]) == 1
    assert "refusing" in capsys.readouterr().err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Kills: a run killed at any moment and started again with the same command ends with the same weights.


def same_final_state(a: Path, b: Path) -> None:
    x, y = load_checkpoint_file(a), load_checkpoint_file(b)
    assert x["epoch"] == y["epoch"] and x["global_step"] == y["global_step"]
    for key in ("model", "model_ema"):
        for name, weight in x[key].items():
            assert torch.equal(weight, y[key][name]), (key, name)


@pytest.fixture(scope="module")
def uninterrupted(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("straight")
    config = write_config(root / "config.yaml", images, root / "out", RESUME_EXTRA)
    result = launch(["--cfg", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir(root / "out") / "ckpt_epoch_2.pth"


# Runs main.py and SIGKILLs itself at a chosen moment, so the kill lands there on any machine speed.
KILLED_RUN = textwrap.dedent("""
    import io, os, runpy, signal, sys
    import torch
    import engine

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[1] == "update":  # before the 5th optimiser update: mid-way through epoch 1 (3 per epoch)
        real_update = engine._optimizer_update
        def dying_update(state, settings, where):
            if state.global_step == 4:
                die()
            return real_update(state, settings, where)
        engine._optimizer_update = dying_update
    else:  # half of epoch 1's first checkpoint reaches the disk, then the process dies
        real_save = torch.save
        def dying_save(obj, f):
            name = os.path.basename(getattr(f, "name", ""))
            if name.startswith("ckpt_epoch_1.pth.") and name.endswith(".tmp"):
                buffer = io.BytesIO()
                real_save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                die()
            real_save(obj, f)
        torch.save = dying_save
    sys.argv = ["main.py", *sys.argv[2:]]
    runpy.run_path("main.py", run_name="__main__")
""")


def killed_run(moment: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLED_RUN, moment, "--cfg", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_sigkill_during_training_then_auto_resume(images: Path, uninterrupted: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", RESUME_EXTRA)
    out = run_dir(tmp_path / "out")
    killed = killed_run("update", config)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "Train: [1/3][2/6]" in killed.stdout  # it died inside epoch 1
    assert load_checkpoint_file(out / "latest.pth")["epoch"] == 0
    result = launch(["--cfg", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stdout and "epoch 0, update 3" in result.stdout
    same_final_state(out / "ckpt_epoch_2.pth", uninterrupted)



@pytest.mark.slow
def test_save_steps_bounds_what_a_sigkill_loses_and_the_run_resumes_inside_the_epoch(images: Path, uninterrupted: Path,
                                                                                    tmp_path: Path) -> None:
    """TRAIN.SAVE_STEPS 2: killed before update 5, the run has latest.pth of update 4, 2 micro-steps into epoch 1."""
    extra = {"TRAIN": {**RESUME_EXTRA["TRAIN"], "SAVE_STEPS": 2}}
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", extra)
    out = run_dir(tmp_path / "out")
    killed = killed_run("update", config)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    saved = load_checkpoint_file(out / "latest.pth")
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (0, 2, 4)
    result = launch(["--cfg", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 steps into epoch 1, update 4" in result.stdout
    same_final_state(out / "ckpt_epoch_2.pth", uninterrupted)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_auto_resume(images: Path, uninterrupted: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", RESUME_EXTRA)
    out = run_dir(tmp_path / "out")
    killed = killed_run("save", config)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert list(out.glob("ckpt_epoch_1.pth.*.tmp")) and not (out / "ckpt_epoch_1.pth").exists()
    assert load_checkpoint_file(out / "latest.pth")["epoch"] == 0  # the previous checkpoint is intact
    result = launch(["--cfg", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    same_final_state(out / "ckpt_epoch_2.pth", uninterrupted)
    assert load_weights(out / "latest.pth").keys() == load_weights(uninterrupted).keys()


def test_options_run_together(images: Path, tmp_path: Path, capsys) -> None:
    """SGD with a step schedule, linear LR scaling, EMA, channels_last and activation checkpointing in one run."""
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {
        "TRAIN": {"EPOCHS": 1, "LR_SCALING": "linear", "USE_CHECKPOINT": True, "OPTIMIZER": {"NAME": "sgd"},
                  "LR_SCHEDULER": {"NAME": "step"}, "EMA": {"ENABLE": True}},
        "CHANNELS_LAST": True,
    })
    assert main.main(["--cfg", str(config)]) == 0
    out = capsys.readouterr().out
    # total batch 4 x 1 process x 1 step = 4, so x 4/512 = 0.0078125
    assert "learning rates (linear scaling, x0.007812): base 7.81e-06, warm-up 7.81e-08, min 7.81e-08" in out
    row = json.loads((run_dir(tmp_path / "out") / "metrics.jsonl").read_text())
    assert {"ema_acc1", "ema_acc5", "ema_val_loss"} <= set(row)
    assert load_checkpoint_file(run_dir(tmp_path / "out") / "latest.pth")["model_ema"] is not None


@pytest.mark.slow  # its parts are checked fast in test_config, test_data, test_checkpoint and test_erf
def test_a_non_square_input_trains_evaluates_and_deploys(images: Path, tmp_path: Path, capsys) -> None:
    """DATA.IMG_SIZE [64, 96] end to end: one epoch of training, the size saved and read back, evaluation, prediction
    and export. Needs StripMLPNet(img_size=(H, W))."""
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out",
                          {"DATA": {"IMG_SIZE": [64, 96]}, "TRAIN": {"EPOCHS": 1, "WARMUP_EPOCHS": 0}})
    assert main.main(["--cfg", str(config)]) == 0
    out = run_dir(tmp_path / "out")
    checkpoint = out / "latest.pth"
    assert load_config(str(out / "config.yaml")).DATA.IMG_SIZE == (64, 96)
    assert config_from_text(load_checkpoint_file(checkpoint)["config"], str(checkpoint)).DATA.IMG_SIZE == (64, 96)
    capsys.readouterr()
    assert main.main(["--cfg", str(out / "config.yaml"), "--eval", "--resume", str(checkpoint), "--tag", "eval"]) == 0
    assert " * Acc@1 " in capsys.readouterr().out
    val = images / "val" / "class_0"
    predicted = launch(["--checkpoint", str(checkpoint), str(val), "--topk", "1"], script=REPO / "tools" / "predict.py")
    assert predicted.returncode == 0, predicted.stderr
    assert sum(line.startswith(str(val)) for line in predicted.stdout.splitlines()) == 5
    exported = launch(["--checkpoint", str(checkpoint), "--format", "torchscript", "--output", str(tmp_path / "m.ts")],
                      script=REPO / "tools" / "export.py")
    assert exported.returncode == 0, exported.stderr
    assert torch.jit.load(str(tmp_path / "m.ts"))(torch.zeros(2, 3, 64, 96)).shape == (2, 3)


@pytest.mark.slow
def test_demo_config_reaches_its_accuracy(tmp_path: Path) -> None:
    """The README's main job: the demo config trains to at least 95% validation top-1 on the CPU."""
    started = time.time()
    result = launch(["--cfg", str(REPO / "configs" / "demo" / "strip_mlp_demo.yaml"), "--data-path",
                     str(tmp_path / "digits"), "--output", str(tmp_path / "out")], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in next((tmp_path / "out").rglob("metrics.jsonl")).read_text().splitlines()]
    print(f"demo: final Acc@1 {rows[-1]['acc1']:.3f} after {len(rows)} epochs in {time.time() - started:.0f}s")
    assert rows[-1]["acc1"] >= 95.0


# ---------------------------------------------------------------------------------------------------------------
# Hardening: what long multi-GPU runs and release checkpoints need


def test_eval_and_throughput_need_only_the_validation_split(trained: Path, images: Path, tmp_path: Path,
                                                            capsys, monkeypatch) -> None:
    monkeypatch.setattr(main, "throughput", functools.partial(engine.throughput, warmup=1, repeats=1))
    val_only = tmp_path / "val_only"
    val_only.mkdir()
    (val_only / "val").symlink_to(images / "val")
    common = ["--cfg", str(trained / "config.yaml"), "--data-path", str(val_only)]
    assert main.main([*common, "--eval", "--resume", str(trained / "latest.pth"), "--tag", "val-only"]) == 0
    assert main.main([*common, "--throughput", "--tag", "val-only-speed"]) == 0
    assert " * Acc@1 " in capsys.readouterr().out


def test_eval_with_weights_of_another_class_count_is_an_error(golden_setup, capsys) -> None:
    """Only training re-initialises a head that does not fit; evaluation would score a random one."""
    config_path, root, _ = golden_setup
    images = write_image_folder(root / "three-classes", classes=3, train_per_class=2, val_per_class=1, size=64)
    code = main.main(["--cfg", str(config_path), "--eval", "--pretrained", str(root / "release.pth"), "--data-path",
                      str(images), "--opts", "MODEL.NUM_CLASSES", "3"])
    assert code == 1
    assert "head.weight: checkpoint (10, 320) vs model (3, 320)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def release_training_file(golden_setup) -> Path:
    """The golden weights as the release's own training code saved them: yacs config, optimiser, epoch 9."""
    _, root, golden = golden_setup
    path = root / "release_training.pth"
    torch.save({"model": golden["state_dict"], "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"t_initial": 300}, "max_accuracy": 55.0, "epoch": 9, "config": release_config(),
                "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}}, path)
    return path


@pytest.mark.slow  # tests/test_resume.py restores the release's checkpoints in-process
def test_release_training_checkpoint_evaluates_fine_tunes_and_resumes(golden_setup, release_training_file: Path,
                                                                       capsys) -> None:
    config_path, _, _ = golden_setup
    def run(*args: str, epochs: int = 1) -> int:
        return main.main(["--cfg", str(config_path), *args, "--opts", "TRAIN.EPOCHS", str(epochs),
                          "TRAIN.WARMUP_EPOCHS", "0"])

    assert run("--eval", "--resume", str(release_training_file), "--tag", "release-eval") == 0
    assert run("--pretrained", str(release_training_file), "--tag", "release-finetune") == 0
    assert run("--resume", str(release_training_file), "--tag", "release-resume", epochs=11) == 0
    captured = capsys.readouterr()
    assert " * Acc@1 " in captured.out and "loaded pretrained weights from" in captured.out
    assert "its optimiser state does not fit" in plain(captured.out)  # the release's optimiser: a fresh state
    # 10 training images in batches of 4: 2 updates per epoch, so epoch 9 ends at update (9 + 1) x 2.
    assert "resumed from" in captured.out and "epoch 9, update 20, best Acc@1 55.000" in captured.out
    assert "config changed since" in captured.out and "TRAIN.EPOCHS: 300 -> 11" in captured.out
    assert "training epochs 10..10" in captured.out


@pytest.mark.slow  # tests/test_resume.py checks the same schedule rule in-process
def test_resume_with_more_epochs_and_a_lower_rate_follows_the_new_schedule(trained: Path, images: Path,
                                                                          tmp_path: Path, capsys) -> None:
    """What the NaN message suggests: resume with a lower TRAIN.BASE_LR (and more epochs). The final rate and
    weight decay are those of a fresh run with the new config at the same update."""
    new = {"TRAIN": {"EPOCHS": 3, "BASE_LR": 4e-4, "WEIGHT_DECAY": 0.01}}
    resumed = write_config(tmp_path / "resumed.yaml", images, tmp_path / "resumed", new)
    assert main.main(["--cfg", str(resumed), "--resume", str(trained / "latest.pth")]) == 0
    out = capsys.readouterr().out
    assert "TRAIN.BASE_LR: 0.001 -> 0.0004" in out and "TRAIN.EPOCHS: 2 -> 3" in out
    fresh = write_config(tmp_path / "fresh.yaml", images, tmp_path / "fresh", new)
    assert main.main(["--cfg", str(fresh)]) == 0
    a = load_checkpoint_file(run_dir(tmp_path / "resumed") / "latest.pth")["optimizer"]["param_groups"]
    b = load_checkpoint_file(run_dir(tmp_path / "fresh") / "latest.pth")["optimizer"]["param_groups"]
    assert [(g["lr"], g["weight_decay"]) for g in a] == [(g["lr"], g["weight_decay"]) for g in b]


@pytest.mark.slow  # tests/test_resume.py checks every change of precision in-process
def test_resume_may_switch_to_float16(trained: Path, images: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {"TRAIN": {"EPOCHS": 3}})
    assert main.main(["--cfg", str(config), "--resume", str(trained / "latest.pth"), "--amp", "--amp-dtype",
                      "float16"]) == 0
    assert load_checkpoint_file(run_dir(tmp_path / "out") / "latest.pth")["scaler"]["scale"] > 0


def test_torchrun_with_one_process_leaves_no_process_group(trained: Path, monkeypatch) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(29400 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(key, value)
    try:
        assert main.main(["--cfg", str(trained / "config.yaml"), "--eval", "--resume", str(trained / "latest.pth"),
                          "--tag", "torchrun1"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])  # a truncated PNG


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 training and 105 validation images: one unreadable file per split is under 1%."""
    return write_image_folder(tmp_path_factory.mktemp("many"), classes=3, train_per_class=40, val_per_class=35)


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_or_stop_the_run(many_images: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
        for folder in (many_images / split).iterdir():
            (data / split / folder.name).mkdir()
            for image in folder.iterdir():
                (data / split / folder.name / image.name).write_bytes(image.read_bytes())
    corrupt(data / "train" / "class_1" / "3.png")
    corrupt(data / "val" / "class_2" / "0.png")
    config = write_config(tmp_path / "config.yaml", data, tmp_path / "out", {"TRAIN": {"EPOCHS": 1}, "PRINT_FREQ": 100})
    skipped = launch(["--cfg", str(config)])
    assert skipped.returncode == 0, skipped.stderr
    row = json.loads((run_dir(tmp_path / "out") / "metrics.jsonl").read_text())
    assert (row["unreadable_images"], row["val_unreadable_images"], row["val_images"]) == (1, 1, 104)
    log = (run_dir(tmp_path / "out") / "log_rank0.txt").read_text()
    assert log.count("class_1/3.png: ") == 1 and "validation loss" in log and "over 104 images" in log

    stopped = launch(["--cfg", str(config), "--tag", "strict", "--opts", "DATA.BAD_IMAGE", "error"])
    assert stopped.returncode == 1
    assert "cannot read image" in stopped.stderr and "class_1/3.png" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not list((run_dir(tmp_path / "out").parent / "strict").glob("*.pth"))

    corrupt(data / "train" / "class_0" / "5.png")  # 2 of 120: more than 1%
    broken = launch(["--cfg", str(config), "--tag", "broken"])
    assert broken.returncode == 1 and "more than 1%" in broken.stderr


# Runs main.py with a loss that turns NaN at the second micro-step on rank 1 only.
NAN_ON_RANK1 = textwrap.dedent("""
    import os, runpy, sys
    sys.path.insert(0, os.getcwd())
    import engine

    real_build = engine.build_criterion

    def build_criterion(config, mixup_active):
        criterion, calls = real_build(config, mixup_active), []

        def poisoned(outputs, targets):
            calls.append(1)
            loss = criterion(outputs, targets)
            return loss * float("nan") if os.environ["RANK"] == "1" and len(calls) == 2 else loss

        return poisoned

    engine.build_criterion = build_criterion
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path("main.py", run_name="__main__")
""")


@pytest.mark.slow
def test_a_nan_on_rank1_stops_both_ranks_with_the_error_on_stderr(images: Path, tmp_path: Path) -> None:
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(NAN_ON_RANK1)
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", {"TRAIN": {"EPOCHS": 1}})
    result = launch(["--cfg", str(config)], nproc=2, timeout=240, script=script)
    assert result.returncode != 0
    errors = plain(result.stderr)
    for rank in (0, 1):
        assert f"rank {rank}] ERROR loss is nan at epoch 0 step 1/3 (optimiser update 1) on rank 1;" in errors, errors


# Runs main.py and sends itself SIGUSR1 during the first update of epoch 1 (update 3), and a SIGTERM while the
# resulting checkpoint is being written: within REPEAT_WINDOW_S, the same request again (as torchrun passes on the
# signal SLURM sent to every process), which changes nothing.
PREEMPTED_RUN = textwrap.dedent("""
    import io, os, runpy, signal, sys
    sys.path.insert(0, os.getcwd())
    import torch
    import engine

    real_update = engine._optimizer_update
    def signalled_update(state, settings, where):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_update(state, settings, where)
    engine._optimizer_update = signalled_update

    real_save = torch.save
    def interrupted_save(obj, f):
        if obj.get("step"):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:1000])
            os.kill(os.getpid(), signal.SIGTERM)  # the second signal lands in the middle of the write
            f.write(buffer.getvalue()[1000:])
        else:
            real_save(obj, f)
    torch.save = interrupted_save
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path("main.py", run_name="__main__")
""")

FAKE_SCONTROL = textwrap.dedent("""\
    #!/bin/sh
    echo "$@" >> "$(dirname "$0")/calls"
    [ "$1" = show ] && echo "JobId=$3 Requeue=1 Restarts=0"
    exit 0
""")


@pytest.mark.slow
def test_a_preemption_signal_saves_inside_the_epoch_requeues_and_resumes(images: Path, uninterrupted: Path,
                                                                        tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "42", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out", RESUME_EXTRA)
    script = tmp_path / "preempted.py"
    script.write_text(PREEMPTED_RUN)
    stopped = launch(["--cfg", str(config)], script=script, env={**os.environ, "OMP_NUM_THREADS": "1", **slurm})
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    out = run_dir(tmp_path / "out")
    saved = load_checkpoint_file(out / "latest.pth")  # whole, although a second signal came during its write
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (0, 4, 5)
    assert (bin_dir / "calls").read_text().splitlines() == ["show job 42", "requeue 42"]
    assert "stopping on request after epoch 1 step 3/6" in stopped.stdout

    resumed = launch(["--cfg", str(config)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "4 steps into epoch 1, update 5" in resumed.stdout
    same_final_state(out / "ckpt_epoch_2.pth", uninterrupted)  # no sample repeated or skipped


# Runs main.py and, during the second optimiser update, has another process send SIGTERM to every process of its
# process group, loader workers included, as SLURM signals every process of a job before preempting it.
TERMINATED_GROUP_RUN = textwrap.dedent("""
    import os, runpy, subprocess, sys
    sys.path.insert(0, os.getcwd())
    import engine

    real_update = engine._optimizer_update
    def signalled_update(state, settings, where):
        if state.global_step == 1:
            subprocess.run([sys.executable, "-c", f"import os, signal; os.killpg({os.getpgrp()}, signal.SIGTERM)"])
        return real_update(state, settings, where)
    engine._optimizer_update = signalled_update
    sys.argv = ["main.py", *sys.argv[1:]]
    runpy.run_path("main.py", run_name="__main__")
""")


def test_a_sigterm_to_every_process_with_loader_workers_still_saves_and_exits_75(images: Path, tmp_path: Path) -> None:
    """torch's loader workers die on a SIGTERM from anyone but their parent; the run must not die with them."""
    config = write_config(tmp_path / "config.yaml", images, tmp_path / "out",
                          {"TRAIN": {"EPOCHS": 1}, "DATA": {"NUM_WORKERS": 2}})
    script = tmp_path / "terminated.py"
    script.write_text(TERMINATED_GROUP_RUN)
    stopped = launch(["--cfg", str(config)], script=script, start_new_session=True)  # its own process group
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    assert "stopping on request after epoch 0 step 2/6" in stopped.stdout
    saved = load_checkpoint_file(run_dir(tmp_path / "out") / "latest.pth")
    assert (saved["epoch"], saved["step"], saved["global_step"]) == (-1, 3, 3)
