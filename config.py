"""Configuration: yacs defaults, YAML files with ``BASE:`` inheritance, ``--opts`` and command-line shortcuts.

The layout follows the Swin-Transformer code base the Strip-MLP release was built on: one default node
with a comment on every key, YAML files that state only what differs, and a config that is frozen once
parsed. Every bad input raises :class:`ConfigError` with one line naming the file (or flag) and the key.
"""

import argparse
import ast
import difflib
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import yaml
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from yacs.config import CfgNode as CN

from utils import RunError

# The values each key with a fixed set of them may take. They are declared here, beside the defaults, and the
# modules that use a key import its list from here; a value outside it is refused whenever a file, --opts or a flag
# sets the key, so nothing downstream checks it again.
# data/datasets.py: image folders and CIFAR; data/robustness.py: ImageNet's robustness test sets (for --eval only)
DATASETS = ("imagenet", "caltech101", "folder", "demo", "cifar10", "cifar100",
            "imagenet_v2", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_real")
BAD_IMAGE_POLICIES = ("skip", "error")
CACHE_MODES = ("no", "part", "full")
INTERPOLATIONS = ("bicubic", "bilinear")
MODEL_TYPES = ("strip_mlp",)
DROP_PATH_SCHEDULES = ("uniform", "linear")
SCHEDULERS = ("cosine", "linear", "step")
OPTIMIZERS = ("adamw", "sgd")
LR_SCALINGS = ("linear", "none")
FREEZE_MODES = ("", "backbone", "stage1", "stage2", "stage3", "stage4")
RANDOM_ERASING_MODES = ("pixel", "rand", "const")  # timm's RandomErasing fills
MIXUP_MODES = ("batch", "pair", "elem")  # timm's Mixup draws its parameters per batch, pair or element
AMP_DTYPES = ("bfloat16", "float16")  # names of torch dtypes
DEVICES = ("auto", "cpu", "cuda")
DISTILL_TYPES = ("none", "soft", "hard")  # distill.py: DeiT's loss on the teacher's probabilities, or its top class

CHOICES: dict[str, tuple[str, ...]] = {
    "DATA.DATASET": DATASETS,
    "DATA.BAD_IMAGE": BAD_IMAGE_POLICIES,
    "DATA.CACHE_MODE": CACHE_MODES,
    "DATA.INTERPOLATION": INTERPOLATIONS,
    "MODEL.TYPE": MODEL_TYPES,
    "MODEL.DROP_PATH_SCHEDULE": DROP_PATH_SCHEDULES,
    "TRAIN.LR_SCHEDULER.NAME": SCHEDULERS,
    "TRAIN.OPTIMIZER.NAME": OPTIMIZERS,
    "TRAIN.LR_SCALING": LR_SCALINGS,
    "TRAIN.FREEZE": FREEZE_MODES,
    "AUG.REMODE": RANDOM_ERASING_MODES,
    "AUG.MIXUP_MODE": MIXUP_MODES,
    "AMP.DTYPE": AMP_DTYPES,
    "DEVICE": DEVICES,
    "DISTILL.TYPE": DISTILL_TYPES,
}


# Keys of earlier versions, and why they went. A file or checkpoint that holds one still loads, with a warning; the
# command line may not set one.
REMOVED_KEYS: dict[str, str] = {
    "TRAIN.START_EPOCH": "a resumed run starts after the checkpoint's epoch",
    "TEST.SEQUENTIAL": "validation shards are strided; contiguous ones gave the same results",
}

# Values that earlier versions wrote and this one reads otherwise, as key: (old value, new value, why). A file or
# checkpoint that holds one still loads, with a warning; the command line must give the new value.
OLD_VALUES: dict[str, tuple[Any, Any, str]] = {
    "TRAIN.ACCUMULATION_STEPS": (0, 1, "0 meant no accumulation, which is 1 micro-batch per update"),
}


class ConfigError(RunError):
    """A bad config file, key or value; its message is one line meant for the user."""


class OutdatedConfigWarning(UserWarning):
    """A key or value of an earlier version in a file or a checkpoint's saved config (REMOVED_KEYS, OLD_VALUES): it
    loads, and the warning says what became of it."""

    def __init__(self, source: str, key: str, change: str) -> None:
        super().__init__(f"{source}: {key} {change}")
        self.key = key


def default_config() -> CN:
    """Return a fresh node holding every key with its default value."""
    c = CN()

    # ---------------------------------------------------------------- data
    c.DATA = CN()
    c.DATA.BATCH_SIZE = 64  # images per process (per GPU) and step
    c.DATA.DATA_PATH = ""  # dataset root; its expected layout depends on DATA.DATASET
    c.DATA.DATASET = "imagenet"  # one of DATASETS
    # Network input size: one side (square inputs) or [height, width], each a multiple of the network's total
    # stride (32). A square [S, S] is stored as S; utils.image_size(config.DATA.IMG_SIZE) gives (height, width).
    c.DATA.IMG_SIZE = 224
    c.DATA.INTERPOLATION = "bicubic"  # resize interpolation for training and evaluation, one of INTERPOLATIONS
    c.DATA.PIN_MEMORY = True  # page-locked host memory for faster copies to the GPU
    c.DATA.NUM_WORKERS = 8  # data-loading worker processes per training process
    # Keep loader workers alive between epochs (saves their start-up each epoch). Augmentation depends only on
    # (SEED, epoch, sample index), so it changes no result.
    c.DATA.PERSISTENT_WORKERS = False
    # What an image that cannot be read or decoded does: "skip" logs its path and trains on the next readable
    # image of the split instead (and leaves it out of validation accuracy); "error" stops the run naming it.
    c.DATA.BAD_IMAGE = "skip"  # one of BAD_IMAGE_POLICIES
    # Read each split from Swin-Transformer's packed format (the release's --zip): DATA_PATH holds train.zip and
    # val.zip, each with <split>_map.txt beside it ("PATH<TAB>LABEL" lines); tools/make_zip_dataset.py writes it.
    c.DATA.ZIP_MODE = False
    # With ZIP_MODE (the release's --cache-mode): "no" reads archive members on demand, "part" holds in memory
    # the members this process reads (each process then trains on its own fixed 1/N of the set, reshuffled each
    # epoch, as Swin), "full" holds every member in every process.
    c.DATA.CACHE_MODE = "no"  # one of CACHE_MODES
    # With ZIP_MODE: the most a member may inflate to, in MiB. A member that declares more, or inflates past its
    # declared size (a zip bomb, a damaged directory), is an unreadable image; no real image comes near it.
    c.DATA.ZIP_MAX_MEMBER_MB = 256
    # Repeated augmentation (DeiT's, and ResMLP's CIFAR recipe): the images of an epoch come this many times each,
    # every copy augmented its own way and, as far as there are processes, on another process. An epoch keeps about
    # the dataset's length (DeiT's: rounded down to a multiple of 256), so it holds about 1/AUG_REPEATS of the images.
    c.DATA.AUG_REPEATS = 1

    # ---------------------------------------------------------------- model
    c.MODEL = CN()
    c.MODEL.TYPE = "strip_mlp"  # architecture family, one of MODEL_TYPES
    c.MODEL.NAME = "strip_mlp_tiny"  # run name; also the sub-folder of OUTPUT
    c.MODEL.PRETRAINED = ""  # weights to start from (model weights only, e.g. the release's checkpoints)
    c.MODEL.RESUME = ""  # checkpoint to resume training from (model, optimiser, scheduler, epoch)
    c.MODEL.NUM_CLASSES = 1000  # classifier outputs; must equal the class count found in the data
    c.MODEL.DROP_RATE = 0.0  # dropout before the head (the release stated values but its network never applied them)
    c.MODEL.DROP_PATH_RATE = 0.1  # stochastic-depth rate
    c.MODEL.DROP_PATH_SCHEDULE = "uniform"  # "uniform": every block gets DROP_PATH_RATE (as the release);
    # "linear": rises from 0 at the first block to DROP_PATH_RATE at the last
    c.MODEL.LABEL_SMOOTHING = 0.1  # label smoothing, applied through Mixup's targets when mixup is on

    c.MODEL.STRIP_MLP = CN()
    c.MODEL.STRIP_MLP.PATCH_SIZE = 4  # side of the non-overlapping patches of the stem (the network needs 4)
    c.MODEL.STRIP_MLP.IN_CHANS = 3  # input image channels
    c.MODEL.STRIP_MLP.EMBED_DIM = 80  # channels of the first stage (doubled at each later stage); a multiple of 8
    c.MODEL.STRIP_MLP.LAYERS = [2, 2, 12, 2]  # blocks per stage, four stages
    c.MODEL.STRIP_MLP.ALPHA = 3  # expansion ratio of the ChannelMixing MLP (hidden width alpha x channels)

    # ---------------------------------------------------------------- training
    c.TRAIN = CN()
    c.TRAIN.EPOCHS = 300  # total training epochs
    c.TRAIN.WARMUP_EPOCHS = 20  # epochs of linear warm-up from WARMUP_LR to BASE_LR
    c.TRAIN.WEIGHT_DECAY = 0.05  # decoupled weight decay (not applied to norms and biases)
    c.TRAIN.BASE_LR = 5e-4  # peak learning rate, at a total batch of LR_REFERENCE_BATCH when LR_SCALING is linear
    c.TRAIN.WARMUP_LR = 5e-7  # learning rate at the start of warm-up
    c.TRAIN.MIN_LR = 5e-6  # learning rate at the end of the schedule
    c.TRAIN.CLIP_GRAD = 5.0  # gradient-norm clipping threshold; 0 turns clipping off
    c.TRAIN.AUTO_RESUME = True  # resume from the newest checkpoint in OUTPUT when there is one
    c.TRAIN.ACCUMULATION_STEPS = 1  # micro-batches per optimiser step; 1 means no accumulation
    c.TRAIN.USE_CHECKPOINT = False  # activation checkpointing: less memory, about a third more compute
    c.TRAIN.LR_SCALING = "linear"  # "linear": scale the three LRs by total batch / LR_REFERENCE_BATCH; "none"
    c.TRAIN.LR_REFERENCE_BATCH = 512  # total batch (batch x processes x accumulation) the LRs are stated for
    c.TRAIN.SYNC_BN = False  # synchronise BatchNorm statistics across processes
    c.TRAIN.TF32 = True  # TensorFloat-32 for float32 matmuls and convolutions on GPUs that have it
    c.TRAIN.KEEP_CHECKPOINTS = 0  # how many epoch checkpoints to keep (oldest deleted first); 0 keeps all
    c.TRAIN.SAVE_STEPS = 0  # also write latest.pth every this many updates inside an epoch; 0: at epoch ends only
    # Layer-wise learning-rate decay for fine-tuning: the head trains at the scheduled rate and each earlier layer
    # group (block, in forward order; the stem first) at LAYER_DECAY times the next one's. 1.0 turns it off; in
    # (0, 1], e.g. 0.8 as ConvNeXt and BEiT fine-tune.
    c.TRAIN.LAYER_DECAY = 1.0
    # Parameters left untouched by training, one of FREEZE_MODES: "" none; "backbone" all but the
    # classifier; "stage1".."stage4" the stem and the stages up to that one, with the merging and skip layers that
    # feed them. Frozen BatchNorm layers also keep their running statistics.
    c.TRAIN.FREEZE = ""

    c.TRAIN.LR_SCHEDULER = CN()
    c.TRAIN.LR_SCHEDULER.NAME = "cosine"  # one of SCHEDULERS
    c.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # epochs between decays ("step" only)
    c.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # factor applied at each decay ("step" only)

    c.TRAIN.OPTIMIZER = CN()
    c.TRAIN.OPTIMIZER.NAME = "adamw"  # one of OPTIMIZERS
    c.TRAIN.OPTIMIZER.EPS = 1e-8  # AdamW epsilon
    c.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)  # AdamW betas
    c.TRAIN.OPTIMIZER.MOMENTUM = 0.9  # SGD momentum (Nesterov)

    c.TRAIN.EMA = CN()
    c.TRAIN.EMA.ENABLE = False  # keep an exponential moving average of the weights and validate it too
    c.TRAIN.EMA.DECAY = 0.9998  # EMA decay per optimiser step

    # ---------------------------------------------------------------- augmentation
    c.AUG = CN()
    c.AUG.COLOR_JITTER = 0.4  # colour-jitter strength; 0 turns it off (also off while AUTO_AUGMENT is used)
    c.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm auto-augment policy string; "none" turns it off
    c.AUG.HFLIP = 0.5  # horizontal-flip probability (0 for data where mirroring changes the class)
    c.AUG.REPROB = 0.25  # random-erasing probability
    c.AUG.REMODE = "pixel"  # random-erasing fill mode, one of RANDOM_ERASING_MODES
    c.AUG.RECOUNT = 1  # random-erasing regions per image
    c.AUG.MIXUP = 0.8  # mixup alpha; mixup is on when > 0
    c.AUG.CUTMIX = 1.0  # cutmix alpha; cutmix is on when > 0
    c.AUG.CUTMIX_MINMAX = None  # cutmix box ratio range [min, max]; overrides CUTMIX and turns cutmix on
    c.AUG.MIXUP_PROB = 1.0  # probability of applying mixup or cutmix to a batch
    c.AUG.MIXUP_SWITCH_PROB = 0.5  # probability of cutmix instead of mixup when both are on
    c.AUG.MIXUP_MODE = "batch"  # mix parameters drawn per "batch", "pair" or "elem"

    # ---------------------------------------------------------------- evaluation
    c.TEST = CN()
    c.TEST.CROP = True  # resize to IMG_SIZE / CROP_PCT (each side) then centre-crop; False resizes straight to IMG_SIZE
    c.TEST.CROP_PCT = 0.875  # with CROP: the share of the resized image's side kept by the crop (ImageNet's 224/256)
    # Horizontal-flip test-time augmentation: evaluation scores the mean of the logits of each image and of its
    # mirror image (two forward passes).
    c.TEST.FLIP = False

    # ---------------------------------------------------------------- mixed precision
    c.AMP = CN()
    c.AMP.ENABLE = False  # autocast the forward pass (replaces the release's apex opt level)
    c.AMP.DTYPE = "bfloat16"  # autocast dtype; "float16" also turns on gradient scaling

    # ---------------------------------------------------------------- run
    c.OUTPUT = "output"  # output root; the run writes to OUTPUT/MODEL.NAME/TAG
    c.TAG = "default"  # experiment tag; last part of the output folder
    c.SAVE_FREQ = 20  # save a checkpoint every this many epochs (and after the last)
    c.PRINT_FREQ = 100  # log every this many steps
    c.SEED = 0  # random seed (each process adds its rank)
    c.EVAL_MODE = False  # only evaluate the weights given by MODEL.RESUME or MODEL.PRETRAINED
    c.THROUGHPUT_MODE = False  # only measure inference throughput
    c.DEVICE = "auto"  # "auto" uses CUDA when available, else the CPU
    # Channels-last memory format for the model's weights (models.build_model) and its inputs (the loaders and
    # engine), in training, evaluation and throughput alike; the results are the same, the speed may differ.
    c.CHANNELS_LAST = False
    c.COMPILE = False  # wrap the model with torch.compile
    c.DETERMINISTIC = False  # deterministic kernels and no cuDNN benchmark (slower, reproducible)

    # ---------------------------------------------------------------- knowledge distillation
    # DeiT's logit distillation for a single-head network: loss = (1 - ALPHA) x label loss + ALPHA x teacher loss,
    # the teacher in eval mode without gradients on the same (mixed) batch, under the same autocast.
    c.DISTILL = CN()
    c.DISTILL.TYPE = "none"  # one of DISTILL_TYPES
    c.DISTILL.ALPHA = 0.5  # weight of the teacher's loss (DeiT's default)
    c.DISTILL.TAU = 1.0  # temperature of the soft loss (DeiT's default)
    c.DISTILL.TEACHER = ""  # any model name timm can build, ours included (strip_mlp_base, regnety_160, ...)
    # The teacher's weights: a checkpoint of ours, the release's, or a plain state dict (nothing is downloaded). Read
    # again by a resumed run: the teacher is never saved in a checkpoint.
    c.DISTILL.TEACHER_CHECKPOINT = ""
    return c


class Allowed(NamedTuple):
    """What a key accepts beyond its type: a test of the value, and the words an error quotes for it."""

    test: Callable[[Any], bool]
    words: str


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Allowed:
    """Finite values from ``low`` to ``high``, each end included unless it is open."""
    def test(value: float) -> bool:
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        return math.isfinite(value) and above and below
    return Allowed(test, f"in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}")


def _at_least(low: float) -> Allowed:
    return Allowed(lambda value: math.isfinite(value) and value >= low, f"{_number(low)} or more")


POSITIVE = Allowed(lambda value: math.isfinite(value) and value > 0, "positive")
PROBABILITY = _interval(0.0, 1.0)
FRACTION = _interval(0.0, 1.0, high_open=True)  # a rate that must leave something: dropout, smoothing, betas

STRIDE = 32  # the network's total stride (the stem's patch of 4, then three 2x mergings)


def _input_size(value: Any) -> bool:
    """One side, or [height, width], of positive integers divisible by the network's total stride."""
    sides = value if isinstance(value, (list, tuple)) else (value, value)
    return len(sides) == 2 and all(isinstance(side, int) and not isinstance(side, bool) and side > 0
                                   and side % STRIDE == 0 for side in sides)


def _augment_policy(policy: str) -> bool:
    """Whether timm's create_transform accepts the policy string (its parser picks the family by the prefix)."""
    if policy in ("", "none"):
        return True
    build = (rand_augment_transform if policy.startswith("rand") else
             augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
    try:
        build(policy, {})
    except Exception:  # timm's parsers fail with AssertionError, KeyError or ValueError on a bad string
        return False
    return True


# Values each key accepts beyond its type (CHOICES aside), declared beside the defaults and checked whenever a file,
# --opts or a flag sets the key, so that a bad value stops before any work, named with what is allowed. The shape of
# the network follows the rules that models/strip_mlp.py applies to its constructor's arguments (a stage width E,
# 2E, 4E and 8E splits into the strip mixing's chunks exactly when E is a multiple of 8). AUG.CUTMIX_MINMAX is
# checked once merged.
LIMITS: dict[str, Allowed] = {
    "DATA.IMG_SIZE": Allowed(_input_size, "one side or [height, width], positive integers divisible by 32 (the "
                                          "network's total stride), e.g. 224 or [192, 256]"),
    "DATA.BATCH_SIZE": POSITIVE,
    "DATA.NUM_WORKERS": _at_least(0),
    "DATA.ZIP_MAX_MEMBER_MB": POSITIVE,
    "DATA.AUG_REPEATS": POSITIVE,
    "MODEL.NUM_CLASSES": POSITIVE,
    "MODEL.DROP_RATE": FRACTION,
    "MODEL.DROP_PATH_RATE": FRACTION,
    "MODEL.LABEL_SMOOTHING": FRACTION,
    "MODEL.STRIP_MLP.IN_CHANS": Allowed(lambda value: value == 3, "3 (the data loaders give RGB images)"),
    "MODEL.STRIP_MLP.PATCH_SIZE": Allowed(lambda value: value == 4, "4 (the stem's patch; with three 2x mergings "
                                                                    "the network downsamples by 32)"),
    "MODEL.STRIP_MLP.EMBED_DIM": Allowed(lambda value: value > 0 and value % 8 == 0,
                                         "a positive multiple of 8 (the strip mixing splits each stage's width into "
                                         "chunks)"),
    "MODEL.STRIP_MLP.LAYERS": Allowed(lambda layers: len(layers) == 4 and min(layers) >= 1,
                                      "4 stage depths of at least one block each, e.g. [2, 2, 12, 2]"),
    "MODEL.STRIP_MLP.ALPHA": POSITIVE,
    "TRAIN.EPOCHS": POSITIVE,
    "TRAIN.WARMUP_EPOCHS": _at_least(0),
    "TRAIN.WEIGHT_DECAY": _at_least(0.0),
    "TRAIN.BASE_LR": POSITIVE,
    "TRAIN.WARMUP_LR": _at_least(0.0),
    "TRAIN.MIN_LR": _at_least(0.0),
    "TRAIN.CLIP_GRAD": _at_least(0.0),
    "TRAIN.ACCUMULATION_STEPS": _at_least(1),
    "TRAIN.LR_REFERENCE_BATCH": POSITIVE,
    "TRAIN.KEEP_CHECKPOINTS": _at_least(0),
    "TRAIN.SAVE_STEPS": _at_least(0),
    "TRAIN.LAYER_DECAY": _interval(0.0, 1.0, low_open=True),
    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS": POSITIVE,
    "TRAIN.LR_SCHEDULER.DECAY_RATE": POSITIVE,  # usually below 1; above 1 raises the rate at each step
    "TRAIN.OPTIMIZER.EPS": POSITIVE,
    "TRAIN.OPTIMIZER.BETAS": Allowed(lambda betas: len(betas) == 2 and all(FRACTION.test(b) for b in betas),
                                     "two values in [0, 1), e.g. [0.9, 0.999]"),
    "TRAIN.OPTIMIZER.MOMENTUM": FRACTION,
    "TRAIN.EMA.DECAY": PROBABILITY,
    "AUG.COLOR_JITTER": _at_least(0.0),
    "AUG.AUTO_AUGMENT": Allowed(_augment_policy, "'none' or a timm policy such as rand-m9-mstd0.5-inc1, "
                                                 "augmix-m5-w4-d2, original, originalr, v0, v0r or 3a"),
    "AUG.HFLIP": PROBABILITY,
    "AUG.REPROB": PROBABILITY,
    "AUG.RECOUNT": POSITIVE,
    "AUG.MIXUP": _at_least(0.0),
    "AUG.CUTMIX": _at_least(0.0),
    "AUG.MIXUP_PROB": PROBABILITY,
    "AUG.MIXUP_SWITCH_PROB": PROBABILITY,
    "TEST.CROP_PCT": _interval(0.0, 1.0, low_open=True),
    "SAVE_FREQ": POSITIVE,
    "PRINT_FREQ": POSITIVE,
    "SEED": _interval(0, 2**32 - 1),  # numpy's seeds are 32-bit
    "DISTILL.ALPHA": PROBABILITY,
    "DISTILL.TAU": POSITIVE,
}


def _parse_literal(text: str) -> Any:
    """Read a string as a Python literal when it is one ("5e-4", "[2, 2]", "True"), else keep the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to the type of ``default``, or raise ConfigError naming key and source."""
    # PyYAML reads 5e-4 (no dot) as a string and --opts gives strings: read them as literals.
    if isinstance(value, str) and not isinstance(default, str):
        value = _parse_literal(value)
    if default is None:  # optional keys (AUG.CUTMIX_MINMAX) accept None or a value
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        if default:  # items take the type of the default's items (LAYERS ints, BETAS floats)
            value = [_coerce(item, default[0], f"{key}[{i}]", source) for i, item in enumerate(value)]
        value = type(default)(value)
    if type(value) is not type(default):
        raise ConfigError(f"{source}: {key} expects type {type(default).__name__} (like {default!r}), got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        choices = ", ".join(choice or repr(choice) for choice in CHOICES[key])  # '' for an empty choice
        raise ConfigError(f"{source}: {key} {value!r} is not supported; choose one of: {choices}")
    if key in LIMITS and not LIMITS[key].test(value):
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{source}: {key} must be {LIMITS[key].words}, got {shown!r}")
    return value


def _image_size_value(value: Any, key: str, source: str) -> int | tuple[int, int]:
    """DATA.IMG_SIZE as the config holds it: a side S, or (height, width) when the sides differ ([S, S] becomes S,
    so square sizes read and dump as before)."""
    if isinstance(value, str):  # --opts gives "224" or "[192, 256]"
        value = _parse_literal(value)
    if not LIMITS[key].test(value):
        raise ConfigError(f"{source}: {key} must be {LIMITS[key].words}, got {value!r}")
    height, width = value if isinstance(value, (list, tuple)) else (value, value)
    return height if height == width else (height, width)


def upgrade_saved(tree: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """A config that a file or a checkpoint holds (nested mappings), as this version reads it: keys since removed
    (REMOVED_KEYS) are left out and old values (OLD_VALUES) replaced, each with an OutdatedConfigWarning, so that
    configs and checkpoints written by earlier versions still load."""
    upgraded = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in REMOVED_KEYS:
            warnings.warn(OutdatedConfigWarning(source, key, f"was removed ({REMOVED_KEYS[key]}); its value is "
                                                             "ignored"), stacklevel=2)
            continue
        if isinstance(value, Mapping):
            value = upgrade_saved(value, source, f"{key}.")
        elif key in OLD_VALUES and type(value) is type(OLD_VALUES[key][0]) and value == OLD_VALUES[key][0]:
            old, new, why = OLD_VALUES[key]
            warnings.warn(OutdatedConfigWarning(source, key, f"{old!r} reads as {new!r} ({why})"), stacklevel=2)
            value = new
        upgraded[name] = value
    return upgraded


def _set_key(config: CN, key: str, value: Any, source: str) -> None:
    """Set dotted ``key`` of a config under construction; nested mappings set their sub-keys."""
    if key in REMOVED_KEYS:  # files and checkpoints pass through upgrade_saved; this is the command line
        raise ConfigError(f"{source}: {key} was removed ({REMOVED_KEYS[key]}); leave it out")
    parts = key.split(".")
    node = config
    for depth, name in enumerate(parts):
        where = ".".join(parts[:depth])
        if not isinstance(node, CN):
            raise ConfigError(f"{source}: unknown key {key}; {where} is a single value without sub-keys")
        if name not in node:
            hint = difflib.get_close_matches(name, list(node.keys()), n=1)
            known = f"did you mean {(where + '.' if where else '') + hint[0]}?" if hint else (
                f"valid keys under {where or 'the top level'}: {', '.join(node)}")
            raise ConfigError(f"{source}: unknown key {key}; {known}")
        if depth < len(parts) - 1:
            node = node[name]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, CN):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} is a section; give it a mapping of sub-keys, got {value!r}")
        for sub_key, sub_value in value.items():
            _set_key(config, f"{key}.{sub_key}", sub_value, source)
        return
    if isinstance(value, dict):
        raise ConfigError(f"{source}: {key} is a single value, not a section; got {value!r}")
    if key == "DATA.IMG_SIZE":  # an int or a pair, which the type of the default cannot express
        node[leaf] = _image_size_value(value, key, source)
    else:
        node[leaf] = _coerce(value, current, key, source)


def _read_yaml(path: str) -> dict:
    """Return the mapping a YAML file holds, or raise ConfigError naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as err:  # a directory, no permission, ...
        raise ConfigError(f"cannot read config file {path}: {err.strerror}; give a readable .yaml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; give a .yaml file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if content is None:  # an empty file changes nothing
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(content).__name__}")
    return upgrade_saved(content, path)


def _bases(path: str, content: dict) -> list[str]:
    """The BASE files a file's content names, as paths (relative to the file), each checked to exist."""
    bases = content.pop("BASE", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: BASE must be a file name or a list of file names, got {bases!r}")
    paths = [os.path.join(os.path.dirname(path), base) for base in bases if base]  # BASE: [''] means none
    for base_path in paths:
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: BASE file {base_path} not found")
    return paths


def _merge_file(config: CN, path: str) -> None:
    """Merge a YAML file into a config under construction, its BASE files first (paths relative to it).

    Each file is read and merged once, at its first place in a depth-first walk (bases before the file that
    names them, in order), so a file named by several others costs nothing more and keeps its first place. The
    walk keeps its own stack: a chain of thousands of files needs no recursion.
    """
    content = dict(_read_yaml(path))
    stack = [(path, os.path.realpath(path), content, iter(_bases(path, content)))]
    done: set[str] = set()
    while stack:
        file_path, real, content, bases = stack[-1]
        base = next(bases, None)
        if base is None:  # its bases are merged: now the file's own keys
            stack.pop()
            done.add(real)
            for key, value in content.items():
                _set_key(config, str(key), value, file_path)
            continue
        base_real = os.path.realpath(base)
        if base_real in done:
            continue
        walk = [frame[1] for frame in stack]
        if base_real in walk:
            loop = " -> ".join(os.path.basename(name) for name in [*walk[walk.index(base_real):], base_real])
            raise ConfigError(f"{file_path}: BASE files include each other in a loop ({loop})")
        base_content = dict(_read_yaml(base))
        stack.append((base, base_real, base_content, iter(_bases(base, base_content))))


def _check_consistency(config: CN) -> None:
    """Checks that involve several keys, run once everything is merged."""
    mixing = config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0 or config.AUG.CUTMIX_MINMAX is not None
    if mixing and config.DATA.BATCH_SIZE % 2:  # timm's Mixup pairs each image with its mirror in the batch
        raise ConfigError(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} must be even while AUG.MIXUP or AUG.CUTMIX is on")
    minmax = config.AUG.CUTMIX_MINMAX
    if minmax is not None and not (isinstance(minmax, list) and len(minmax) == 2 and 0 < minmax[0] < minmax[1] <= 1):
        raise ConfigError(f"AUG.CUTMIX_MINMAX must be None or [min, max] with 0 < min < max <= 1, got {minmax!r}")
    if config.DATA.CACHE_MODE != "no" and not config.DATA.ZIP_MODE:
        raise ConfigError(f"DATA.CACHE_MODE {config.DATA.CACHE_MODE} caches members of packed archives; it needs "
                          "DATA.ZIP_MODE True (--zip)")
    if config.DATA.AUG_REPEATS > 1 and config.DATA.CACHE_MODE == "part":
        raise ConfigError(f"DATA.AUG_REPEATS {config.DATA.AUG_REPEATS} sends an image's copies to other processes, "
                          "but DATA.CACHE_MODE part keeps each process on its own shard; use CACHE_MODE full or no")
    if config.DISTILL.TYPE != "none" and not (config.DISTILL.TEACHER and config.DISTILL.TEACHER_CHECKPOINT):
        raise ConfigError(f"DISTILL.TYPE {config.DISTILL.TYPE} needs DISTILL.TEACHER (a timm model name, e.g. "
                          "strip_mlp_base) and DISTILL.TEACHER_CHECKPOINT (its weights file)")


def _shortcut_values(args: argparse.Namespace) -> list[tuple[str, str, Any]]:
    """(flag, key, value) for each command-line shortcut the user gave."""
    given = [
        ("--batch-size", "DATA.BATCH_SIZE", args.batch_size),
        ("--data-path", "DATA.DATA_PATH", args.data_path),
        ("--pretrained", "MODEL.PRETRAINED", args.pretrained),
        ("--resume", "MODEL.RESUME", args.resume),
        ("--accumulation-steps", "TRAIN.ACCUMULATION_STEPS", args.accumulation_steps),
        ("--use-checkpoint", "TRAIN.USE_CHECKPOINT", args.use_checkpoint or None),
        ("--output", "OUTPUT", args.output),
        ("--tag", "TAG", args.tag),
        ("--eval", "EVAL_MODE", args.eval or None),
        ("--throughput", "THROUGHPUT_MODE", args.throughput or None),
        ("--amp", "AMP.ENABLE", args.amp or None),
        ("--amp-dtype", "AMP.DTYPE", args.amp_dtype),
        ("--zip", "DATA.ZIP_MODE", args.zip or None),
        ("--cache-mode", "DATA.CACHE_MODE", args.cache_mode),
    ]
    # The release's apex levels: O0 is full precision, O1/O2 were float16 mixed precision.
    if args.amp_opt_level is not None:
        given.append(("--amp-opt-level", "AMP.ENABLE", args.amp_opt_level != "O0"))
        if args.amp_opt_level != "O0" and args.amp_dtype is None:
            given.append(("--amp-opt-level", "AMP.DTYPE", "float16"))
    return [(flag, key, value) for flag, key, value in given if value is not None]


def _merge_opts(config: CN, opts: Sequence[str]) -> None:
    """Set ``KEY VALUE`` pairs (``--opts``) in a config under construction."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs; {opts[-1]!r} has no value")
    for key, value in zip(opts[0::2], opts[1::2], strict=True):
        _set_key(config, key, value, "--opts")


def config_from_text(text: str, source: str, opts: Sequence[str] = ()) -> CN:
    """The frozen config a checkpoint saved (a full YAML dump), with ``KEY VALUE`` overrides.

    What earlier versions saved is read as :func:`upgrade_saved` says, so older checkpoints keep working.
    """
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{source}: its saved config is not valid YAML; give --cfg FILE") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{source}: its saved config is not a mapping of keys; give --cfg FILE")
    config = default_config()
    for key, value in _flatten(upgrade_saved(content, source)):
        _set_key(config, key, value, source)
    _merge_opts(config, opts)
    _check_consistency(config)
    config.freeze()
    return config


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested mapping."""
    leaves = []
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves += _flatten(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def update_config(config: CN, args: argparse.Namespace) -> CN:
    """Return a frozen copy of ``config`` with ``args.cfg``, ``args.opts`` and the shortcut flags applied.

    Order, later winning: the YAML file (after its BASE files), ``--opts``, then the shortcut flags.
    The run's output folder becomes OUTPUT/MODEL.NAME/TAG, as in the release.
    """
    config = config.clone()
    config.defrost()
    if args.cfg:
        _merge_file(config, args.cfg)
    _merge_opts(config, args.opts or [])
    for flag, key, value in _shortcut_values(args):
        _set_key(config, key, value, flag)
    _check_consistency(config)
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()
    return config


def get_config(args: argparse.Namespace) -> CN:
    """Return the frozen config for parsed command-line ``args`` (see :func:`build_parser`)."""
    return update_config(default_config(), args)


def load_config(cfg_file: str, opts: Sequence[str] = ()) -> CN:
    """Return the frozen config of one YAML file plus ``KEY VALUE`` overrides (for tools and tests)."""
    return get_config(build_parser().parse_args(["--cfg", cfg_file, *(["--opts", *opts] if opts else [])]))


def dump_config(config: CN, path: str) -> None:
    """Write the full config as YAML that ``--cfg`` can read back (OUTPUT aside, which gains NAME/TAG again)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(config.dump())


def build_parser() -> argparse.ArgumentParser:
    """The training script's command line: the release's flags, with ``--amp`` in place of apex."""
    parser = argparse.ArgumentParser("Strip-MLP training and evaluation")
    parser.add_argument("--cfg", type=str, required=True, metavar="FILE", help="path to a YAML config file")
    parser.add_argument("--opts", default=None, nargs="+", metavar="KEY VALUE",
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 100 DATA.NUM_WORKERS 4")
    parser.add_argument("--batch-size", type=int, help="batch size per process (DATA.BATCH_SIZE)")
    parser.add_argument("--data-path", type=str, help="dataset root (DATA.DATA_PATH)")
    parser.add_argument("--pretrained", type=str, help="weights to start from (MODEL.PRETRAINED)")
    parser.add_argument("--resume", type=str, help="checkpoint to resume from (MODEL.RESUME)")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing to save memory")
    parser.add_argument("--amp", action="store_true", help="mixed precision (AMP.ENABLE)")
    parser.add_argument("--amp-dtype", choices=AMP_DTYPES, help="mixed-precision dtype (AMP.DTYPE)")
    parser.add_argument("--amp-opt-level", choices=("O0", "O1", "O2"),
                        help="deprecated apex level from the release: O0 is off, O1/O2 mean --amp --amp-dtype float16")
    parser.add_argument("--output", type=str, metavar="PATH", help="output root; the run writes to PATH/NAME/TAG")
    parser.add_argument("--tag", type=str, help="experiment tag (TAG)")
    parser.add_argument("--eval", action="store_true", help="evaluate only")
    parser.add_argument("--throughput", action="store_true", help="measure throughput only")
    # torch.distributed.launch passes --local_rank (older) or --local-rank; torchrun sets LOCAL_RANK instead,
    # which is what the training script reads. Accepted so the release's command lines keep working.
    parser.add_argument("--local_rank", "--local-rank", type=int, dest="local_rank", help=argparse.SUPPRESS)
    parser.add_argument("--zip", action="store_true",
                        help="read train.zip/val.zip with their map files, Swin's packed format (DATA.ZIP_MODE)")
    parser.add_argument("--cache-mode", choices=CACHE_MODES,
                        help="with --zip: hold no, this process's part, or all of the members in memory "
                             "(DATA.CACHE_MODE)")
    return parser


def parse_option(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, CN]:
    """Parse the command line into (args, frozen config).

    Raises:
        ConfigError: a bad config file, key or value (a malformed command line exits as argparse does).
    """
    args = build_parser().parse_args(argv)
    return args, get_config(args)


if __name__ == "__main__":  # print the merged config: python config.py --cfg FILE [--opts ...]
    try:
        sys.stdout.write(parse_option()[1].dump())
    except ConfigError as err:
        sys.exit(f"error: {err}")
