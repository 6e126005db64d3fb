"""Strip-MLP models. Importing this package registers the four variants with timm."""

from .build import MODEL_TYPES, build_model
from .strip_mlp import DROP_PATH_SCHEDULES, VARIANTS, StripMLPNet, checkpoint_filter_fn, clean_state_dict

__all__ = ["DROP_PATH_SCHEDULES", "MODEL_TYPES", "VARIANTS", "StripMLPNet", "build_model", "checkpoint_filter_fn",
           "clean_state_dict"]
