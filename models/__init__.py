"""Strip-MLP models. Importing this package registers the four variants with timm."""

from .build import build_model
from .strip_mlp import VARIANTS, StripMLPNet, checkpoint_filter_fn, clean_state_dict

__all__ = [
    "VARIANTS",
    "StripMLPNet",
    "build_model",
    "checkpoint_filter_fn",
    "clean_state_dict",
]
