"""hubconf.py through torch.hub: the four variants, any class count and input size, weights from a checkpoint."""

import importlib.util
from pathlib import Path

import pytest
import torch

from checkpoint import save_checkpoint
from models import StripMLPNet

REPO = Path(__file__).resolve().parents[1]


def test_the_entry_points_are_the_four_variants() -> None:
    """torch.hub.list's rule (public callables of hubconf.py), which reads only GitHub repositories itself."""
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    public = sorted(name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_"))
    assert public == ["strip_mlp_base", "strip_mlp_small", "strip_mlp_tiny", "strip_mlp_tiny_light"]


def test_load_builds_the_variant_for_the_given_classes_and_size() -> None:
    model = torch.hub.load(str(REPO), "strip_mlp_tiny", source="local", num_classes=10, img_size=64)
    assert isinstance(model, StripMLPNet) and model.img_size == (64, 64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert [len(stage) for stage in (model.blocks1, model.blocks2, model.blocks3, model.blocks4)] == [2, 2, 12, 2]


def test_weights_come_from_a_checkpoint_file_never_from_a_download(tmp_path: Path) -> None:
    source = StripMLPNet(img_size=32, num_classes=3, embed_dim=80, layers=(2, 2, 6, 2))
    save_checkpoint({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "release.pth")
    model = torch.hub.load(str(REPO), "strip_mlp_tiny_light", source="local", num_classes=3, img_size=32,
                           checkpoint=str(tmp_path / "release.pth"))
    expected = source.state_dict()
    assert all(torch.equal(weight, expected[name]) for name, weight in model.state_dict().items())
    with pytest.raises(ValueError, match="pass checkpoint='FILE' instead of pretrained=True"):
        torch.hub.load(str(REPO), "strip_mlp_base", source="local", pretrained=True)
    with pytest.raises(Exception, match="head.weight: checkpoint \\(3, 640\\) vs model \\(1000, 640\\)"):
        torch.hub.load(str(REPO), "strip_mlp_tiny_light", source="local", img_size=32,
                       checkpoint=str(tmp_path / "release.pth"))
