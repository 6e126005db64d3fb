"""Strip-MLP models. Importing this package registers the four variants with timm."""

from .build import MODEL_TYPES, build_model
from .strip_mlp import VARIANTS, StripMLPNet, checkpoint_filter_fn

__all__ = ["MODEL_TYPES", "VARIANTS", "StripMLPNet", "build_model", "checkpoint_filter_fn"]
