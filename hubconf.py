"""torch.hub entry points: the four Strip-MLP variants of the paper, for any class count and input size.

    model = torch.hub.load("OWNER/REPO", "strip_mlp_tiny", num_classes=1000, img_size=224)
    model = torch.hub.load("path/to/checkout", "strip_mlp_small", source="local", num_classes=10, img_size=64,
                           checkpoint="best.pth")
    model = torch.hub.load("path/to/checkout", "strip_mlp_tiny", source="local", checkpoint="published/")

Keywords go to ``StripMLPNet`` (``num_classes``, ``img_size``, ``drop_path_rate``, ...). Nothing is downloaded: the
release's weights have no fixed address, so ``checkpoint=FILE`` loads a checkpoint of ours or the release's from
disk, read as weights only and checked name by name against the model. ``checkpoint=DIR`` loads a folder that
``tools/publish.py`` wrote: its ``config.json`` gives the architecture's arguments (keywords given here override
them; another input size is resampled) and ``model.safetensors`` the weights.

Building a network needs only torch, timm and ``models``; loading a published folder or ``.safetensors`` file also
safetensors, and reading a pickled checkpoint the training code's loader, which needs the rest of requirements.txt
(PyYAML, yacs, ...).
"""

import os

from torch import nn

import models as _models  # registers the variants with timm
from models import published as _published

dependencies = ["torch", "timm"]


def _weights(checkpoint: str, model: nn.Module) -> dict:
    """The weights of a published folder or .safetensors file, or of a checkpoint file, fitted to ``model``."""
    path = os.path.join(checkpoint, _published.WEIGHTS_FILE) if os.path.isdir(checkpoint) else checkpoint
    if path.endswith(".safetensors"):
        return _models.checkpoint_filter_fn(_published.load_weights(path), model)
    import checkpoint as _checkpoint  # only here: the loader brings the training code's requirements

    return _checkpoint.fit_state_dict(_checkpoint.load_checkpoint_file(path), model, path)


def _build(variant: str, pretrained: bool, checkpoint: str | None, **kwargs) -> nn.Module:
    if pretrained:
        raise ValueError(f"{variant}: the release's weights cannot be downloaded from a fixed address; download "
                         "them yourself and pass checkpoint='FILE' instead of pretrained=True")
    saved = _published.saved_arguments(checkpoint, variant) if checkpoint and os.path.isdir(checkpoint) else {}
    model = _models.StripMLPNet(**{**_models.VARIANTS[variant], **saved, **kwargs})
    if checkpoint is not None:
        model.load_state_dict(_weights(str(checkpoint), model))
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
