"""What the tools share: bad input stops every tool with one ``error: ...`` line and exit status 1, the tools around
a trained model take ``--checkpoint`` (and ``--resume``, its former name), and their model loader."""

import importlib
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointError, save_checkpoint
from config import load_config
from models import StripMLPNet

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO / "configs" / "demo" / "strip_mlp_demo.yaml")
sys.path.insert(0, str(REPO / "tools"))
from model_cli import checkpoint_class_names, load_for_inference  # noqa: E402  (tools/ is not a package)

# Every tools/*.py with a main, run as `python tools/NAME.py`.
TOOLS = sorted(path.stem for path in (REPO / "tools").glob("*.py") if "\ndef main(" in path.read_text())

# A bad input for each tool and what its error line says. {missing} names nothing, {file} is a file (image.png,
# not an image), {tmp} an empty folder.
BAD_INPUT = {
    "benchmark": (["--model", "strip_mlp_huge", "--no-memory"], "unknown model 'strip_mlp_huge'"),
    "benchmark_pipeline": (["--json", "{file}/rows.jsonl"], "is a file, not a folder"),
    "dynamic_size_cost": (["--model", "strip_mlp_huge"], "unknown model 'strip_mlp_huge'"),
    "erf": (["--checkpoint", "{missing}", "--data-path", "{tmp}", "--output", "{tmp}/erf.png"], "does not exist"),
    "export": (["--checkpoint", "{missing}", "--format", "torchscript", "--output", "{tmp}/m.ts"], "does not exist"),
    "gpu_check": (["--only", "no_such_part"], "no part is left to run"),
    "make_demo_data": (["--dst", "{file}"], "is not a demo dataset"),
    "make_zip_dataset": (["{missing}", "{tmp}/packed"], "is not a folder"),
    "plot_log": (["{missing}"], "not found"),
    "predict": (["--checkpoint", "{missing}", "{file}"], "does not exist"),
    "prepare_imagenet": (["--val", "{missing}", "--labels", "{file}"], "is not a folder"),
    "publish": (["--checkpoint", "{missing}", "--output", "{tmp}/published"], "does not exist"),
    "resize_eval": (["--checkpoint", "{missing}", "--sizes", "64"], "does not exist"),
    "split_caltech101": (["--src", "{missing}", "--dst", "{tmp}/split"], "is not a folder"),
}

# The tools that load a trained model, and the other arguments each requires.
INFERENCE_TOOLS = {
    "erf": ["--data-path", "data", "--output", "erf.png"],
    "export": ["--format", "onnx", "--output", "m.onnx"],
    "predict": ["image.png"],
    "resize_eval": ["--sizes", "64"],
}


def run_in_process(path: Path, args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit status and stderr of the tool's ``__main__`` block, run here (quick: the imports are done)."""
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exited:
        patch.setattr(sys, "argv", [str(path), *args])
        runpy.run_path(str(path), run_name="__main__")
    return exited.value.code, capsys.readouterr().err


def run_as_script(path: Path, args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit status and stderr of ``python tools/NAME.py`` from outside the checkout: it finds the checkout itself."""
    result = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def test_every_tool_has_a_bad_input_here() -> None:
    assert TOOLS == sorted(BAD_INPUT)


@pytest.mark.parametrize("run", [run_in_process, pytest.param(run_as_script, marks=pytest.mark.slow)])
@pytest.mark.parametrize("tool", TOOLS)
def test_bad_input_gives_one_error_line_and_exit_status_1(tool: str, run, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "image.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    args, message = BAD_INPUT[tool]
    args = [arg.format(missing=tmp_path / "missing", file=tmp_path / "image.png", tmp=tmp_path / "empty")
            for arg in args]
    status, err = run(REPO / "tools" / f"{tool}.py", args, capsys)
    assert status == 1, err
    [line] = err.splitlines()
    assert line.startswith("error: ") and message in line


@pytest.mark.parametrize("flag", ["--checkpoint", "--resume"])
@pytest.mark.parametrize("tool", sorted(INFERENCE_TOOLS))
def test_inference_tools_take_checkpoint_and_resume_as_its_alias(tool: str, flag: str) -> None:
    args = importlib.import_module(tool).build_parser().parse_args([flag, "trained.pth", *INFERENCE_TOOLS[tool]])
    assert args.checkpoint in ("trained.pth", ["trained.pth"])  # erf takes several


def test_a_trained_model_is_rebuilt_from_its_checkpoint_alone(tmp_path: Path) -> None:
    config = load_config(DEMO_CFG)
    model = StripMLPNet(img_size=32, num_classes=10, embed_dim=32, layers=(1, 1, 2, 1))
    saved = config.dump().replace("TRAIN:\n", "TRAIN:\n  START_EPOCH: 0\n")  # a key earlier versions saved
    names = [f"digit {i}" for i in range(10)]
    save_checkpoint({"model": model.state_dict(), "config": saved, "classes": names}, tmp_path / "ours.pth")
    inference = load_for_inference(tmp_path / "ours.pth", opts=["DATA.BATCH_SIZE", "8"])
    assert inference.classes == names and inference.config.DATA.BATCH_SIZE == 8 and not inference.model.training
    assert torch.equal(inference.model.head.weight, model.head.weight)

    save_checkpoint({"model": model.state_dict()}, tmp_path / "release.pth")
    with pytest.raises(CheckpointError, match="carries no config of this repository .* give --cfg"):
        load_for_inference(tmp_path / "release.pth")
    assert load_for_inference(tmp_path / "release.pth", cfg_file=DEMO_CFG).classes == [str(i) for i in range(10)]


def test_release_imagenet_checkpoints_get_imagenet_class_names() -> None:
    names = checkpoint_class_names({}, 1000)
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]
