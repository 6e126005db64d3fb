"""tools/erf.py: contribution scores, RepLKNet's area ratio, the figure of several models, and bad input."""

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyRun
from run_helpers import write_config, write_image_folder
from torch import nn

from config import load_config
from data import DataError
from logger import ProgressLine
from utils import RunError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import erf  # noqa: E402  (tools/ is a folder of scripts, not a package)

CPU = torch.device("cpu")


def test_smallest_square_holds_more_than_the_threshold() -> None:
    data = np.zeros((9, 9))
    data[4, 4] = 1.0
    assert erf.smallest_square(data, 0.5, (4, 4)) == erf.Square(3, 3, 3, 3, 9 / 81)  # RepLKNet starts at side 3
    data[:] = 1.0
    assert erf.smallest_square(data, 0.2, (4, 4)).height == 5  # 25 > 0.2 x 81 > 9
    assert erf.smallest_square(data, 0.99, (4, 4)).area_ratio == 1.0
    cut = erf.smallest_square(data, 0.5, (7, 7))  # near the corner the square is cut at the edges
    assert (cut.top, cut.left, cut.height, cut.width) == (2, 2, 7, 7)


def test_scores_of_a_batch_are_those_of_its_images_one_by_one(tiny_run: TinyRun) -> None:
    """Batching the backward pass is exact: in eval mode each image's gradient is its own."""
    args = erf.build_parser().parse_args(["--checkpoint", str(tiny_run.checkpoint), "--data-path", str(tiny_run.images),
                                          "--output", "unused.png"])
    [(label, config, model)] = erf.load_models(args, CPU)
    progress = ProgressLine(enabled=False)
    batched = erf.contribution_scores(model, config, 3, 6, 6, CPU, progress, label)
    single = erf.contribution_scores(model, config, 3, 6, 1, CPU, progress, label)
    assert batched.images == single.images == 6 and batched.centre == (24, 24)  # 2x2 output: patch 16..31
    np.testing.assert_allclose(batched.scores, single.scores, rtol=1e-5, atol=1e-9)
    assert batched.scores.min() >= 0 and batched.scores.max() > 0


def test_trained_and_random_models_side_by_side(tiny_run: TinyRun, tmp_path: Path, capsys) -> None:
    output = tmp_path / "erf.png"
    assert erf.main(["--checkpoint", str(tiny_run.checkpoint), "random", "--data-path", str(tiny_run.images),
                     "--num-images", "6", "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert all(f"t={t}" in header for t in (0.2, 0.3, 0.5, 0.99))
    rows = [line.split() for line in lines if line.startswith(("tiny/run/best.pth", "random (untrained)"))]
    assert len(rows) == 2 and all(row[-10:-8] == ["6", "32x32"] for row in rows)
    ratios = [float(row[-2]) for row in rows]  # t=0.99
    assert all(0 < ratio <= 1 for ratio in ratios)
    assert output.read_bytes()[:4] == b"\x89PNG"


def test_any_input_size_the_model_is_built_for(tiny_run: TinyRun, tmp_path: Path, capsys) -> None:
    cfg = write_config(tmp_path / "big.yaml", tiny_run.images, tmp_path / "out", {"DATA": {"IMG_SIZE": 64}})
    assert erf.main(["--checkpoint", "random", "--cfg", str(cfg), "--data-path", str(tiny_run.images), "--stage", "2",
                     "--num-images", "3", "--output", str(tmp_path / "erf.png")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("random"))
    assert " 3 " in row and "64x64" in row


class PatchNet(nn.Module):
    """A one-stage stand-in network: a 16-pixel patch convolution, so that each output position sees its own patch."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks1 = nn.ModuleList([nn.Conv2d(3, 2, 16, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks1[0](x)


def test_a_non_square_map_is_height_by_width_around_the_traced_position(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", classes=3, train_per_class=1, val_per_class=1)
    config = load_config(str(write_config(tmp_path / "c.yaml", images, tmp_path / "out",
                                          {"DATA": {"IMG_SIZE": [64, 96]}})))
    result = erf.contribution_scores(PatchNet().eval(), config, 1, 3, 2, CPU, ProgressLine(enabled=False), "patch")
    # Output 4x6: the centre position (2, 3) sees input rows 32..47 and columns 48..63, and its middle pixel.
    assert result.scores.shape == (64, 96) and result.centre == (40, 56)
    assert np.argwhere(result.scores > 0).min(0).tolist() == [32, 48]
    assert np.argwhere(result.scores > 0).max(0).tolist() == [47, 63]


def test_a_non_square_model_end_to_end(tiny_run: TinyRun, tmp_path: Path, capsys) -> None:
    """Needs StripMLPNet(img_size=(H, W))."""
    cfg = write_config(tmp_path / "wide.yaml", tiny_run.images, tmp_path / "out", {"DATA": {"IMG_SIZE": [64, 96]}})
    output = tmp_path / "erf.png"
    assert erf.main(["--checkpoint", "random", "--cfg", str(cfg), "--data-path", str(tiny_run.images), "--stage", "3",
                     "--num-images", "3", "--output", str(output)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("random"))
    assert " 3 " in row and "64x96" in row
    assert output.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_refused(tiny_run: TinyRun, tmp_path: Path) -> None:
    common = ["--data-path", str(tiny_run.images), "--output", str(tmp_path / "erf.png")]
    checkpoint = ["--checkpoint", str(tiny_run.checkpoint)]
    cases = [
        ([*checkpoint, "--stage", "5", *common], RunError, "--stage 5: the model has stages 1 to 4"),
        (["--checkpoint", "random", *common], RunError, "'random' needs a config: give --cfg FILE"),
        ([*checkpoint, "--num-images", "0", *common], RunError, "must be 1 or more"),
        ([*checkpoint, "--data-path", str(tmp_path / "none"), "--output", "x.png"], DataError,
         "is not a folder; set DATA.DATA_PATH"),
    ]
    for args, error, message in cases:
        with pytest.raises(error) as refused:
            erf.main(args)
        assert message in str(refused.value), args
    assert not (tmp_path / "erf.png").exists()


def test_models_take_the_data_path_as_their_dataset_root(tiny_run: TinyRun) -> None:
    args = argparse.Namespace(checkpoint=["random", str(tiny_run.checkpoint)], cfg=None, opts=["DATA.NUM_WORKERS", "0"],
                              data_path="/somewhere", device="cpu")
    models = erf.load_models(args, CPU)
    assert [label for label, _, _ in models] == ["random (untrained)", "tiny/run/best.pth"]
    assert all(config.DATA.DATA_PATH == "/somewhere" and config.DATA.NUM_WORKERS == 0 for _, config, _ in models)
    with pytest.raises(AssertionError):  # the untrained model is not the trained one
        torch.testing.assert_close(models[0][2].head.weight, models[1][2].head.weight)
