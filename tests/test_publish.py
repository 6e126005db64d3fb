"""tools/publish.py: a published folder loads offline through timm, torch.hub and --pretrained with the checkpoint's
exact logits, holds no pickle, resamples to other sizes, and its model card carries the run's metrics."""

import json
import logging
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import timm
import torch
import yaml
from conftest import TinyRun, golden_architecture
from run_helpers import run_dir, write_config

import main
from checkpoint import CheckpointError, load_checkpoint_file, load_pretrained, save_checkpoint
from config import config_from_text
from logger import read_metrics
from models import StripMLPNet, build_model
from models.published import WEIGHTS_FILE
from utils import RunError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import publish  # noqa: E402  (tools/ is a folder of scripts, not a package)
from model_cli import load_for_inference  # noqa: E402

QUIET = logging.Logger("quiet")


class Published(NamedTuple):
    """A checkpoint, the model it holds (eval mode) and the folder publish.py wrote from it."""

    checkpoint: Path
    model: StripMLPNet
    folder: Path


@pytest.fixture(scope="module")
def published(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Published:
    folder = tmp_path_factory.mktemp("published") / "strip_mlp_tiny_run"
    assert publish.main(["--checkpoint", str(tiny_run.checkpoint), "--output", str(folder)]) == 0
    return Published(tiny_run.checkpoint, load_for_inference(tiny_run.checkpoint).model, folder)


def safetensors_header(path: Path) -> dict:
    """The JSON header that opens a safetensors file: 8 bytes of little-endian length, then that much JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


@torch.no_grad()
def test_timm_torch_hub_and_pretrained_load_the_exact_logits_without_unpickling(published: Published, tiny_run: TinyRun,
                                                                                 tmp_path: Path, monkeypatch) -> None:
    assert sorted(p.name for p in published.folder.iterdir()) == ["README.md", "config.json", WEIGHTS_FILE]
    header = safetensors_header(published.folder / WEIGHTS_FILE)
    assert set(header) - {"__metadata__"} == set(published.model.state_dict())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = published.model(images)
    as_pretrained = build_model(config_from_text(load_checkpoint_file(published.checkpoint)["config"], "ckpt"))

    def evaluate(flag: str, weights: Path) -> str:
        """main.py --eval's predictions.csv for the weights given by ``flag``."""
        config = write_config(tmp_path / f"{flag[2:]}.yaml", tiny_run.images, tmp_path / flag[2:])
        assert main.main(["--cfg", str(config), "--eval", flag, str(weights)]) == 0
        return (run_dir(tmp_path / flag[2:]) / "eval" / "predictions.csv").read_text()

    predicted = evaluate("--resume", published.checkpoint)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load (a pickle reader) was called on published weights")

    monkeypatch.setattr(torch, "load", forbidden)  # from here on, only published files are read
    through_timm = timm.create_model(f"local-dir:{published.folder}", pretrained=True).eval()
    through_hub = torch.hub.load(str(REPO), "strip_mlp_tiny", source="local", checkpoint=str(published.folder)).eval()
    load_pretrained(as_pretrained, load_checkpoint_file(published.folder / WEIGHTS_FILE), "published", QUIET)
    for model in (through_timm, through_hub, as_pretrained.eval()):
        assert torch.equal(model(images), expected)
    assert evaluate("--pretrained", published.folder / WEIGHTS_FILE) == predicted


def test_the_model_card_holds_the_model_and_the_runs_metrics(published: Published, tiny_run: TinyRun) -> None:
    card = (published.folder / "README.md").read_text()
    checkpoint = load_checkpoint_file(published.checkpoint)
    row = next(row for row in read_metrics(tiny_run.run / "metrics.jsonl") if row["epoch"] == checkpoint["epoch"])
    assert f"- these weights, epoch {row['epoch']}: top-1 {row['acc1']:.3f}, top-5 {row['acc5']:.3f}" in card
    parameters = sum(p.numel() for p in published.model.parameters())
    assert f"| parameters | {parameters / 1e6:.2f} M ({parameters:,}) |" in card
    assert "| variant | custom (embed_dim 8, layers [1, 1, 1, 1]) |" in card
    assert "| input size | 3 x 32 x 32, bicubic resize, crop 1.000" in card
    assert "| classes | 3: class_0, class_1, class_2 |" in card and "| dataset | folder (DATA.DATASET) |" in card
    assert "| MACs | " in card and yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == yaml.safe_load(
        checkpoint["config"])
    config = json.loads((published.folder / "config.json").read_text())
    assert config["architecture"] == "strip_mlp_tiny" and config["label_names"] == ["class_0", "class_1", "class_2"]
    assert config["model_args"] == {"img_size": 32, "patch_size": 4, "in_chans": 3, "num_classes": 3, "embed_dim": 8,
                                    "layers": [1, 1, 1, 1], "alpha": 3}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["num_classes"] == 3


def test_the_model_card_summarises_the_eval_reports_beside_the_checkpoint(published: Published,
                                                                         tmp_path: Path) -> None:
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "best.pth").write_bytes(published.checkpoint.read_bytes())
    (tmp_path / "run" / "eval" / "per_class.csv").write_text(
        "class,images,top-1,top-5\nclass_0,4,100.000,100.000\nclass_1,6,50.000,100.000\nclass_2,0,,\n")
    folder = tmp_path / "published"
    assert publish.main(["--checkpoint", str(tmp_path / "run" / "best.pth"), "--output", str(folder)]) == 0
    card = (folder / "README.md").read_text()
    assert ("From `eval/per_class.csv` (main.py --eval) over 10 images: top-1 70.000, top-5 100.000, mean class "
            "accuracy 75.000.") in card
    assert "No `metrics.jsonl` beside the checkpoint." in card


@torch.no_grad()
def test_weights_of_another_size_are_resampled_as_any_other(published: Published) -> None:
    """--pretrained and timm carry the 32 px weights to a 64 px model as a checkpoint's are carried."""
    checkpoint = load_checkpoint_file(published.checkpoint)
    config = config_from_text(checkpoint["config"], "ckpt", ["DATA.IMG_SIZE", "64"])
    from_checkpoint, from_published = build_model(config), build_model(config)
    load_pretrained(from_checkpoint, checkpoint, "ckpt", QUIET)
    load_pretrained(from_published, load_checkpoint_file(published.folder / WEIGHTS_FILE), "published",
                    QUIET)
    through_timm = timm.create_model(f"local-dir:{published.folder}", pretrained=True, img_size=64)
    resampled = [name for name, tensor in from_checkpoint.state_dict().items()
                 if tensor.shape != published.model.state_dict()[name].shape]
    assert resampled  # the strip projections and position tables of a 64 px model are of another shape
    for model in (from_published, through_timm):
        assert all(torch.equal(tensor, from_checkpoint.state_dict()[name])
                   for name, tensor in model.state_dict().items())


@torch.no_grad()
def test_the_releases_golden_checkpoint_publishes_with_its_logits(golden: dict, golden_model: StripMLPNet,
                                                                  tmp_path: Path) -> None:
    architecture = golden_architecture(golden)
    release = tmp_path / "release.pth"
    save_checkpoint({"model": {f"module.{k}": v for k, v in golden["state_dict"].items()}, "epoch": 40}, release)
    cfg = tmp_path / "release.yaml"
    cfg.write_text(yaml.safe_dump({
        "DATA": {"IMG_SIZE": architecture["img_size"]},
        "MODEL": {"NUM_CLASSES": architecture["num_classes"],
                  "STRIP_MLP": {"EMBED_DIM": architecture["embed_dim"], "LAYERS": list(architecture["layers"]),
                                "ALPHA": architecture["alpha"], "PATCH_SIZE": architecture["patch_size"]}}}))
    folder = tmp_path / "published"
    assert publish.main(["--checkpoint", str(release), "--cfg", str(cfg), "--output", str(folder)]) == 0
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    logits = model(golden["input"])
    assert torch.equal(logits, golden_model(golden["input"]))
    assert torch.allclose(logits, golden["logits"], atol=1e-4 * golden["logits"].abs().max().item())
    assert "No `metrics.jsonl` beside the checkpoint." in (folder / "README.md").read_text()


@torch.no_grad()
def test_ema_publishes_the_average_and_a_run_without_one_is_refused(published: Published, tmp_path: Path) -> None:
    checkpoint = load_checkpoint_file(published.checkpoint)
    average = {name: tensor + 0.01 if tensor.is_floating_point() else tensor
               for name, tensor in checkpoint["model"].items()}
    save_checkpoint({**checkpoint, "model_ema": average}, tmp_path / "ema.pth")
    for ema, expected in ((True, average), (False, checkpoint["model"])):
        folder = tmp_path / f"ema_{ema}"
        assert publish.main(["--checkpoint", str(tmp_path / "ema.pth"), "--output", str(folder)]
                            + ["--ema"] * ema) == 0
        weights = load_checkpoint_file(folder / WEIGHTS_FILE)
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    with pytest.raises(RunError) as refused:
        publish.main(["--checkpoint", str(published.checkpoint), "--output", str(tmp_path / "x"), "--ema"])
    assert str(refused.value) == (f"{published.checkpoint} holds no EMA weights (its run had TRAIN.EMA.ENABLE off, "
                                  "or it is the release's); publish its weights without --ema")
    assert not (tmp_path / "x").exists()


def test_nothing_is_overwritten_and_bad_files_are_named(published: Published, tmp_path: Path) -> None:
    before = {path.name: path.read_bytes() for path in published.folder.iterdir()}
    with pytest.raises(RunError, match=f"--output {published.folder} already holds model.safetensors, config.json, "
                                       "README.md; publishing never overwrites"):
        publish.main(["--checkpoint", str(published.checkpoint), "--output", str(published.folder)])
    assert {path.name: path.read_bytes() for path in published.folder.iterdir()} == before

    with pytest.raises(CheckpointError, match=f"is a folder; .* e.g. {published.folder / WEIGHTS_FILE}"):
        load_checkpoint_file(published.folder)
    truncated = tmp_path / WEIGHTS_FILE
    truncated.write_bytes(before[WEIGHTS_FILE][:100])
    with pytest.raises(CheckpointError, match="not a whole safetensors file"):
        load_checkpoint_file(truncated)
    with pytest.raises(ValueError, match="publishes strip_mlp_tiny, not strip_mlp_small"):
        torch.hub.load(str(REPO), "strip_mlp_small", source="local", checkpoint=str(published.folder))
