"""Image transforms: the release's recipe (timm's training pipeline, a resize-and-centre-crop for evaluation),
ending in uint8 (C, H, W) tensors.

Each transform starts from the encoded bytes of an image (``EncodedImage``) and decodes them itself: the training
crop is drawn from the header first, so a JPEG can be decoded by the fastest decoder that gives the same pixels,
or at a reduced size when its crop is large enough (Pillow's draft mode). Conversion to float, normalisation
and random erasing happen per batch on the device (``data.DeviceLoader``), which spares the loader workers about
an eighth of the release's work per image and sends a quarter of the bytes through shared and pinned memory.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from yacs.config import CfgNode

from compat import timm_eval_resize
from utils import image_size

from .datasets import EncodedImage, decode_rgb, open_image

# At or below this side (both sides, for non-square inputs) the release treats images as CIFAR-sized and
# pads-and-crops instead of random-resized cropping (which would keep too few of 32x32 pixels).
SMALL_IMAGE_SIDE = 32

# A JPEG is decoded at 1/2, 1/4 or 1/8 of its size only while the crop keeps at least this many times the
# output size: the antialiased resize that follows still reduces by 2x or more, which Pillow deems
# indistinguishable from a full-size resample (the default reducing_gap of Image.thumbnail, which drafts
# the same way).
DRAFT_GAP = 2.0


def _decode_jpeg(image: EncodedImage) -> torch.Tensor | None:
    """A JPEG's pixels (3, H, W) by torchvision's libjpeg-turbo decoder, or None where it fails (a damaged file, a
    variant it does not read): Pillow then decodes it, or names what is wrong with it."""
    try:
        return decode_jpeg(torch.frombuffer(image.data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


class DecodingRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation and torchvision's RandomHorizontalFlip in one step that decodes
    the image too; 1.7 times as fast as decoding, cropping and flipping as the release did (docs/performance.md).

    The crop is drawn exactly as timm draws it (its ``get_params``, from python's ``random``, on the size the
    header gives), then the flip as torchvision draws it (``torch.rand(1) < p``, only when p > 0), so the
    release's recipe and random draws are kept. What changed, and by how much:

    - a JPEG is decoded by torchvision's libjpeg-turbo decoder, straight into a tensor: the same pixels as
      Pillow's decoder (same library, same inverse DCT and upsampling), without Pillow's conversion to its
      own 4-byte layout and back;
    - the crop is resized by torch's antialiased uint8 interpolation, which computes Pillow's separable filter
      with vectorised fixed-point arithmetic: it matches Pillow's resize except for +-1 or 2 on a few pixels
      in a thousand, in a quarter of the time on AVX2 / AVX-512 CPUs;
    - a JPEG whose crop keeps at least DRAFT_GAP times the output size at 1/2, 1/4 or 1/8 scale is decoded at
      that scale instead (Pillow's draft mode, a scaled inverse DCT), the crop box rounded to that pixel grid.

    Args:
        crop: the timm transform whose size, scale, ratio and (bicubic or bilinear) interpolation are used.
        hflip: probability of a horizontal flip (the release's AUG.HFLIP); 0 draws nothing.
    """

    def __init__(self, crop: RandomResizedCropAndInterpolation, hflip: float = 0.0) -> None:
        self.size = crop.size  # (height, width)
        self.scale = crop.scale
        self.ratio = crop.ratio
        self.mode = crop.interpolation.value  # "bicubic" or "bilinear", the names torch uses too
        self.hflip = hflip

    def draft_reduction(self, crop_height: int, crop_width: int) -> int:
        """The largest JPEG draft reduction (1, 2, 4 or 8) that keeps DRAFT_GAP times the output size."""
        for reduction in (8, 4, 2):
            if min(crop_height / self.size[0], crop_width / self.size[1]) >= DRAFT_GAP * reduction:
                return reduction
        return 1

    def _crop_by_pillow(self, header: Image.Image, box: tuple[int, int, int, int], reduction: int) -> torch.Tensor:
        """The crop (3, h, w) decoded by Pillow, at 1/reduction size where the JPEG draft mode allows it."""
        full_width = header.width
        # draft() returns None (and does nothing) for formats other than JPEG and for decoded images.
        drafted = header.draft(None, (header.width // reduction, header.height // reduction)) if reduction > 1 else None
        scale = full_width / drafted[1][2] if drafted else 1  # drafted[1]: the full image's box at the new scale
        image = decode_rgb(header)
        left, top, right, bottom = box
        box = (round(left / scale), round(top / scale),
               min(round(right / scale), image.width), min(round(bottom / scale), image.height))
        return torch.from_numpy(np.array(image.crop(box))).permute(2, 0, 1)  # (h, w, 3) -> (3, h, w), channels-last

    def __call__(self, image: EncodedImage | Image.Image) -> Image.Image:
        header = open_image(image) if isinstance(image, EncodedImage) else image
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(header, self.scale, self.ratio)
        box = (left, top, left + width, top + height)
        reduction = self.draft_reduction(height, width)
        pixels = None
        if isinstance(image, EncodedImage) and header.format == "JPEG" and reduction == 1:
            pixels = _decode_jpeg(image)  # (3, H, W)
        crop = pixels[:, top:top + height, left:left + width] if pixels is not None else \
            self._crop_by_pillow(header, box, reduction)
        # Channels-last input takes torch's vectorised uint8 path.
        resized = F.interpolate(crop[None].contiguous(memory_format=torch.channels_last), size=self.size,
                                mode=self.mode, antialias=True)[0]  # (3, H, W)
        if self.hflip > 0 and torch.rand(1) < self.hflip:
            resized = resized.flip(-1)
        # Three planes merged by Pillow: four times faster than making the (H, W, 3) copy Image.fromarray needs.
        return Image.merge("RGB", [Image.fromarray(plane) for plane in resized.numpy()])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, mode={self.mode}, "
                f"hflip={self.hflip})")


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 (3, H, W) tensor (a channels-last view of its bytes); three times faster than
    torchvision's pil_to_tensor, which goes through numpy's array interface."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # bytearray: writable, as torch wants
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def build_transform(is_train: bool, config: CfgNode) -> Callable[[EncodedImage | Image.Image], torch.Tensor]:
    """The training (augmenting) or evaluation transform for DATA.IMG_SIZE inputs: an EncodedImage (or a decoded
    Pillow image, as CIFAR's) to a uint8 (3, H, W) tensor."""
    size = image_size(config.DATA.IMG_SIZE)  # (H, W)
    small = max(size) <= SMALL_IMAGE_SIDE
    interpolation = config.DATA.INTERPOLATION
    if is_train:
        aug = config.AUG
        # use_prefetcher: timm's own split of the recipe, the host part ending in a uint8 tensor; normalisation
        # and random erasing (AUG.REPROB, REMODE, RECOUNT) are left to data.DeviceLoader.
        transform = create_transform(
            input_size=size,
            is_training=True,
            use_prefetcher=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT != "none" else None,
            hflip=aug.HFLIP,
            interpolation=interpolation,
        )
        if small:
            # Resize first so that larger images still come out at `size`; the crop then only shifts.
            transform.transforms[0] = transforms.Compose([
                decode_rgb,
                transforms.Resize(size, interpolation=str_to_interp_mode(interpolation)),
                transforms.RandomCrop(size, padding=4),
            ])
        else:
            crop, *rest = transform.transforms
            flip = rest.pop(0) if rest and isinstance(rest[0], transforms.RandomHorizontalFlip) else None
            transform.transforms = [DecodingRandomResizedCrop(crop, hflip=flip.p if flip else 0.0), *rest]
        transform.transforms[-1] = to_uint8_tensor  # in place of timm's MaybePILToTensor
        return transform

    if config.TEST.CROP and not small:
        # timm's evaluation resize and centre crop, keeping the ratio TEST.CROP_PCT (ImageNet's 224 of 256 by
        # default) at any input size: the shorter side to 1 / CROP_PCT of its target for square inputs; for others,
        # the image scaled to cover (H, W) / CROP_PCT with its aspect kept.
        resize = timm_eval_resize(size, config.TEST.CROP_PCT, interpolation)
    else:
        resize = [transforms.Resize(size, interpolation=str_to_interp_mode(interpolation))]
    return transforms.Compose([decode_rgb, *resize, to_uint8_tensor])
