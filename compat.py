"""Where the supported versions of torch, torchvision and timm differ (requirements.txt gives the range): one
function per difference, so that the rest of the code is written for one behaviour.
"""

from timm.data import create_transform
from timm.data.transforms import ResizeKeepRatio, str_to_interp_mode
from torch import nn

try:  # timm 1.0.31 and later keep a model's current input size apart from its pretrained_cfg
    from timm.models._input import get_model_input_config, update_model_input_size
except ImportError:
    get_model_input_config = update_model_input_size = None


def timm_eval_resize(size: tuple[int, int], crop_pct: float, interpolation: str) -> list[nn.Module]:
    """timm's evaluation resize and centre crop for an (H, W) input, without its final tensor conversion.

    timm before 1.0.31 builds the resize of a non-square input (ResizeKeepRatio) without the interpolation it is
    given, so it resized bilinearly where 1.0.31 and later use, for example, bicubic; the interpolation is set here
    on every version.
    """
    steps = create_transform(input_size=size, is_training=False, use_prefetcher=True, crop_pct=crop_pct,
                             interpolation=interpolation).transforms[:-1]  # less timm's MaybePILToTensor
    for step in steps:
        if isinstance(step, ResizeKeepRatio):
            step.interpolation = str_to_interp_mode(interpolation)
    return steps


def record_input_size(model: nn.Module, img_size: tuple[int, int]) -> None:
    """Tell timm that ``model`` now takes ``img_size``: timm 1.0.31 and later record it among the model's traits
    (read by their data configuration and tests); earlier versions read `pretrained_cfg` alone, which the model
    updates itself."""
    if update_model_input_size is not None:
        update_model_input_size(model, img_size)


def model_input_config(model: nn.Module) -> dict:
    """What timm takes a model's inputs to be: its input traits in timm 1.0.31 and later, its `pretrained_cfg`
    before."""
    return get_model_input_config(model) if get_model_input_config is not None else dict(model.pretrained_cfg)
