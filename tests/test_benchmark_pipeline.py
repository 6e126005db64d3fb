"""tools/benchmark_pipeline.py on a tiny setting: both pipelines run on the generated JPEGs and are reported."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import benchmark_pipeline  # noqa: E402  (tools/ is a folder of scripts, not a package)


def test_generated_jpegs_are_of_imagenet_like_sizes(tmp_path: Path) -> None:
    from PIL import Image

    paths = benchmark_pipeline.write_jpegs(tmp_path, 12)
    sizes = [Image.open(path).size for path in paths]
    assert all(400 <= max(size) <= 800 and 3 / 4 - 0.01 <= size[0] / size[1] <= 4 / 3 + 0.01 for size in sizes)
    assert {path.parent.name for path in paths} == {f"photo_{i}" for i in range(9)}  # nine photographs


def test_both_pipelines_are_timed_paired_and_by_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert benchmark_pipeline.main(["--images", "8", "--img-size", "64", "--batch-size", "2", "--rounds", "2",
                                    "--workers", "0", "--stages", "--json", str(tmp_path / "rows.jsonl")]) == 0
    result = json.loads((tmp_path / "rows.jsonl").read_text())
    for name in ("release", "ours"):
        assert 0 < result[f"{name}_img_s_min"] <= result[f"{name}_img_s_median"] <= result[f"{name}_img_s_max"]
    assert result["ratio_min"] <= result["ratio_median"] <= result["ratio_max"]
    assert list(result["stages_ms"]["release"]) == [
        "read (load_rgb_image)", "RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment",
        "MaybeToTensor", "Normalize", "RandomErasing"]
    assert list(result["stages_ms"]["ours"]) == [
        "read (read_image)", "DecodingRandomResizedCrop", "RandAugment", "to_uint8_tensor"]
    assert "ours / release = " in capsys.readouterr().out


def test_too_few_images_for_a_timed_batch_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        benchmark_pipeline.main(["--images", "3", "--batch-size", "2"])
    assert "--images 3 must be at least twice --batch-size 2" in capsys.readouterr().err
