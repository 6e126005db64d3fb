"""Build a model from the yacs configuration; keys map one to one onto constructor keywords."""

from yacs.config import CfgNode

from .strip_mlp import StripMLPNet

MODEL_TYPES = ("strip_mlp",)

# The config keys behind the constructor keywords that decide whether the network can be built.
ARCHITECTURE_KEYS = {"img_size": "DATA.IMG_SIZE", "patch_size": "MODEL.STRIP_MLP.PATCH_SIZE",
                     "embed_dim": "MODEL.STRIP_MLP.EMBED_DIM", "layers": "MODEL.STRIP_MLP.LAYERS"}


def build_model(config: CfgNode) -> StripMLPNet:
    """Build the network that `config.MODEL.TYPE` names, for `config.DATA.IMG_SIZE` inputs."""
    if config.MODEL.TYPE not in MODEL_TYPES:
        raise ValueError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; valid: {', '.join(MODEL_TYPES)}")
    strip = config.MODEL.STRIP_MLP
    return StripMLPNet(
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
