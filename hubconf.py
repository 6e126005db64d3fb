"""torch.hub entry points: the four Strip-MLP variants of the paper, for any class count and input size.

    model = torch.hub.load("OWNER/REPO", "strip_mlp_tiny", num_classes=1000, img_size=224)
    model = torch.hub.load("path/to/checkout", "strip_mlp_small", source="local", num_classes=10, img_size=64,
                           checkpoint="best.pth")

Keywords go to ``StripMLPNet`` (``num_classes``, ``img_size``, ``drop_path_rate``, ...). Nothing is downloaded: the
release's weights have no fixed address, so ``checkpoint=FILE`` loads a checkpoint of ours or the release's from
disk, read as weights only and checked name by name against the model.

Building a network needs only torch, timm and ``models``; reading a checkpoint uses the training code's loader,
which also needs the rest of requirements.txt (PyYAML, yacs, ...).
"""

from torch import nn

import models as _models  # registers the variants with timm

dependencies = ["torch", "timm"]


def _build(variant: str, pretrained: bool, checkpoint: str | None, **kwargs) -> nn.Module:
    if pretrained:
        raise ValueError(f"{variant}: the release's weights cannot be downloaded from a fixed address; download "
                         "them yourself and pass checkpoint='FILE' instead of pretrained=True")
    model = _models.StripMLPNet(**{**_models.VARIANTS[variant], **kwargs})
    if checkpoint is not None:
        import checkpoint as _checkpoint  # only here: the loader brings the training code's requirements

        weights = _checkpoint.load_checkpoint_file(checkpoint)
        model.load_state_dict(_checkpoint.fit_state_dict(weights, model, checkpoint))
    return model


def strip_mlp_tiny_light(pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """Strip-MLP-T* (light tiny): 18.2 M parameters, 2.52 GMACs at 224."""
    return _build("strip_mlp_tiny_light", pretrained, checkpoint, **kwargs)


def strip_mlp_tiny(pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """Strip-MLP-T: 24.9 M parameters, 3.65 GMACs at 224."""
    return _build("strip_mlp_tiny", pretrained, checkpoint, **kwargs)


def strip_mlp_small(pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """Strip-MLP-S: 42.6 M parameters, 6.80 GMACs at 224."""
    return _build("strip_mlp_small", pretrained, checkpoint, **kwargs)


def strip_mlp_base(pretrained: bool = False, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """Strip-MLP-B: 57.2 M parameters, 9.18 GMACs at 224."""
    return _build("strip_mlp_base", pretrained, checkpoint, **kwargs)
