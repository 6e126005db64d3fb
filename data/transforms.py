"""Image transforms as the release: timm's training pipeline and a resize-and-centre-crop for evaluation."""

from collections.abc import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms
from yacs.config import CfgNode

# At or below this side the release treats images as CIFAR-sized and pads-and-crops instead of
# random-resized cropping (which would keep too few of 32x32 pixels).
SMALL_IMAGE_SIDE = 32

INTERPOLATIONS = ("bicubic", "bilinear")
RANDOM_ERASING_MODES = ("pixel", "rand", "const")  # timm's RandomErasing fills


def build_transform(is_train: bool, config: CfgNode) -> Callable:
    """The training (augmenting) or evaluation transform for DATA.IMG_SIZE inputs."""
    size = config.DATA.IMG_SIZE
    interpolation = config.DATA.INTERPOLATION
    if is_train:
        aug = config.AUG
        transform = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT != "none" else None,
            hflip=aug.HFLIP,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=interpolation,
        )
        if size <= SMALL_IMAGE_SIDE:
            # Resize first so that larger images still come out at `size`; the crop then only shifts.
            transform.transforms[0] = transforms.Compose([
                transforms.Resize((size, size), interpolation=str_to_interp_mode(interpolation)),
                transforms.RandomCrop(size, padding=4),
            ])
        return transform

    if config.TEST.CROP and size > SMALL_IMAGE_SIDE:
        # Keep ImageNet's 224-of-256 ratio at any input size.
        resize = [
            transforms.Resize(int(size * 256 / 224), interpolation=str_to_interp_mode(interpolation)),
            transforms.CenterCrop(size),
        ]
    else:
        resize = [transforms.Resize((size, size), interpolation=str_to_interp_mode(interpolation))]
    return transforms.Compose([
        *resize,
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
