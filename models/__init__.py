"""Strip-MLP models. Importing this package registers the four variants with timm."""

from .build import ARCHITECTURE_KEYS, MODEL_TYPES, build_model
from .strip_mlp import (
    DROP_PATH_SCHEDULES,
    VARIANTS,
    StripMLPNet,
    check_architecture,
    checkpoint_filter_fn,
    clean_state_dict,
    image_size,
)

__all__ = [
    "ARCHITECTURE_KEYS",
    "DROP_PATH_SCHEDULES",
    "MODEL_TYPES",
    "VARIANTS",
    "StripMLPNet",
    "build_model",
    "check_architecture",
    "checkpoint_filter_fn",
    "clean_state_dict",
    "image_size",
]
