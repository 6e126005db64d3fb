"""docs/transfer.md's detection recipe, small: a torchvision Faster R-CNN on a Strip-MLP + FPN backbone of dynamic input
size trains on batches of changing size and detects."""

from collections import OrderedDict

import pytest
import timm
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import models  # noqa: F401  (registers the variants)
from models.layers import RelativePosition, StripProjection


class StripMLPFPN(nn.Module):
    """Stage outputs (strides 4-32) through a feature pyramid, as torchvision's detectors take a backbone."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def tiny_body() -> nn.Module:
    """Stage outputs of a small model built for 64 x 64 that takes any size (multiples of 32)."""
    return timm.create_model("strip_mlp_tiny_light", features_only=True, img_size=64, dynamic_img_size=True,
                             embed_dim=16, layers=(1, 1, 1, 1), drop_path_rate=0.0)


def test_the_pyramid_has_a_map_per_stride_for_a_batch_of_another_size() -> None:
    """What a torchvision detector takes from its backbone, for a padded batch other than the built 64 x 64."""
    backbone = StripMLPFPN(tiny_body(), out_channels=32)
    with torch.no_grad():
        maps = backbone(torch.rand(2, 3, 128, 192))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape) for m in maps.values()] == [(2, 32, 128 // s, 192 // s) for s in (4, 8, 16, 32, 64)]


@pytest.mark.slow  # about 15 s of CPU time
def test_faster_rcnn_trains_on_batches_of_changing_size_and_detects() -> None:
    torch.manual_seed(0)
    body = tiny_body()
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    detector = FasterRCNN(StripMLPFPN(body, out_channels=32), num_classes=3, min_size=64, max_size=128,
                          rpn_anchor_generator=anchors, rpn_batch_size_per_image=32, box_batch_size_per_image=32,
                          box_score_thresh=0.0)
    seen = set()
    body.register_forward_pre_hook(lambda _, args: seen.add(tuple(args[0].shape[-2:])))
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    strips = [m for m in body.modules() if isinstance(m, StripProjection | RelativePosition)]
    built = [p.detach().clone() for m in strips for p in m.parameters()]

    detector.train()
    for sizes in (((64, 96), (80, 64)), ((100, 70), (70, 100)), ((64, 128), (128, 64))):
        images = [torch.rand(3, *size) for size in sizes]
        targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])} for _ in sizes]
        losses = detector(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in strips for p in m.parameters())
        optimizer.step()
    assert len(seen) >= 2 and (64, 64) not in seen  # batches padded to their own sizes, none the built one
    assert all(not torch.equal(p, b) for p, b in zip((p for m in strips for p in m.parameters()), built, strict=True))

    detector.eval()
    with torch.no_grad():
        detections = detector([torch.rand(3, 72, 96), torch.rand(3, 96, 64)])
    for found, (height, width) in zip(detections, ((72, 96), (96, 64)), strict=True):
        assert found["boxes"].shape[0] > 0 and found["boxes"].shape[1] == 4
        assert found["labels"].shape == found["scores"].shape == found["boxes"].shape[:1]
        assert (found["boxes"][:, 2:] <= torch.tensor([width, height]) + 1e-3).all()  # within the image
