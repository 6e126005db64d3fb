"""Build a model from the yacs configuration; keys map one to one onto constructor keywords.

The package reads a config's attributes but imports neither config.py nor yacs: config.py has checked every value
(MODEL.TYPE among them), and the network needs only torch and timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .strip_mlp import StripMLPNet

if TYPE_CHECKING:
    from yacs.config import CfgNode


def build_model(config: CfgNode) -> StripMLPNet:
    """The network that ``config.MODEL`` describes (MODEL.TYPE strip_mlp, the one type) for ``config.DATA.IMG_SIZE``
    inputs, with its weights in channels-last memory format when ``config.CHANNELS_LAST`` asks for it."""
    strip = config.MODEL.STRIP_MLP
    model = StripMLPNet(
        img_size=config.DATA.IMG_SIZE,
        patch_size=strip.PATCH_SIZE,
        in_chans=strip.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=strip.EMBED_DIM,
        layers=tuple(strip.LAYERS),
        alpha=strip.ALPHA,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        drop_path_schedule=config.MODEL.DROP_PATH_SCHEDULE,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
    )
    return model.to(memory_format=torch.channels_last) if config.CHANNELS_LAST else model
