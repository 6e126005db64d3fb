"""tools/export.py: each format exports the trained tiny model, runs like it at other batch sizes, and is checked."""

import sys
import warnings
from pathlib import Path

import onnxruntime
import pytest
import torch
from conftest import TinyRun

from models import StripMLPNet
from utils import RunError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import export  # noqa: E402  (tools/ is a folder of scripts, not a package)
from model_cli import load_for_inference  # noqa: E402


def run_file(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """The exported file run as a deployment would run it, independently of the tool's own check."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    return module(images)


@pytest.mark.parametrize("fmt, suffix", [
    pytest.param("onnx", ".onnx", marks=pytest.mark.slow),  # the fixed-batch test below exports ONNX fast
    ("torchscript", ".ts"),
    ("exported", ".pt2"),
])
def test_each_format_runs_like_the_model_at_any_batch_size(tiny_run: TinyRun, tmp_path: Path, fmt: str, suffix: str,
                                                         capsys) -> None:
    output = tmp_path / f"model{suffix}"
    assert export.main(["--checkpoint", str(tiny_run.checkpoint), "--format", fmt, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {output} ({fmt}, dynamic batch" in out
    assert "largest |logit difference| from PyTorch over batches of 1, 3: " in out and "(tolerance 0.001)" in out
    assert [p.name for p in tmp_path.iterdir()] == [output.name]  # one self-contained file
    model = load_for_inference(tiny_run.checkpoint).model
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_file(fmt, output, images), model(images), rtol=0, atol=1e-5)


def test_a_fixed_batch_is_fixed_in_the_onnx_graph(tiny_run: TinyRun, tmp_path: Path, capsys) -> None:
    output = tmp_path / "model.onnx"
    assert export.main(["--checkpoint", str(tiny_run.checkpoint), "--format", "onnx", "--output", str(output),
                        "--batch-size", "4"]) == 0
    assert "over batches of 4, 4" in capsys.readouterr().out
    assert onnxruntime.InferenceSession(str(output)).get_inputs()[0].shape == [4, 3, 32, 32]


def test_a_difference_above_the_tolerance_fails(tiny_run: TinyRun, tmp_path: Path, capsys, monkeypatch) -> None:
    real = export.load_exported
    monkeypatch.setattr(export, "load_exported", lambda *args: (lambda images: real(*args)(images) + 0.01))
    output = tmp_path / "model.ts"
    with pytest.raises(RunError, match=r"^the exported model differs from PyTorch by 0.01, more than --tolerance"):
        export.main(["--checkpoint", str(tiny_run.checkpoint), "--format", "torchscript", "--output", str(output)])
    assert "largest |logit difference| from PyTorch over batches of 1, 3: 0.01 " in capsys.readouterr().out
    assert output.exists()  # kept for inspection


def test_missing_packages_and_bad_arguments_are_refused(tiny_run: TinyRun, tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    checkpoint = ["--checkpoint", str(tiny_run.checkpoint)]
    with pytest.raises(RunError, match="name the output"):
        export.main([*checkpoint, "--format", "exported", "--output", str(tmp_path / "model.onnx")])
    assert not (tmp_path / "model.onnx").exists()
    with pytest.raises(RunError, match="--tolerance must be 0 or more"):
        export.main([*checkpoint, "--format", "torchscript", "--output", str(tmp_path / "m.ts"), "--tolerance", "-1"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunError) as refused:
        export.main([*checkpoint, "--format", "torchscript", "--output", str(tmp_path / "a_file" / "m.ts")])
    assert str(refused.value) == f"--output {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file, not a folder; " \
                                 "give another path"
    with pytest.raises(SystemExit):  # argparse's usage error
        export.main([*checkpoint, "--format", "onnx", "--output", str(tmp_path / "m.onnx"), "--batch-size", "0"])
    assert "expected a positive number or 'dynamic', got '0'" in capsys.readouterr().err

    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name: None if name == "onnxruntime" else real_find_spec(name))
    with pytest.raises(RunError, match="onnxruntime not installed: pip install -r requirements-dev.txt"):
        export.main([*checkpoint, "--format", "onnx", "--output", str(tmp_path / "m.onnx")])


def test_the_model_computes_the_same_with_and_without_gradients() -> None:
    """Export runs without gradients, where GRN leaves its autograd function for plain operations: same numbers."""
    torch.manual_seed(0)
    model = StripMLPNet(img_size=32, num_classes=4, embed_dim=8, layers=(1, 1, 1, 1)).eval()
    for name, parameter in model.named_parameters():
        if name.endswith("gamma"):  # GRN starts as the identity; make it act
            torch.nn.init.normal_(parameter)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        without = model(images)
    assert torch.equal(model(images), without)
