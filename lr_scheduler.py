"""Learning-rate schedules with warm-up, stepped once per optimiser update (not per epoch).

The schedules are timm's, built with ``t_in_epochs=False`` and counted in updates, so that gradient
accumulation and the last incomplete accumulation group of an epoch are counted correctly. A parameter group with
an ``lr_scale`` (TRAIN.LAYER_DECAY) gets the scheduled rate times that scale: timm's ``update_groups`` applies it.
"""

from dataclasses import dataclass

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from yacs.config import CfgNode


@dataclass(frozen=True)
class LearningRates:
    """The learning rates a run actually uses, after TRAIN.LR_SCALING."""

    base: float
    warmup: float
    minimum: float
    scale: float


def effective_learning_rates(config: CfgNode, world_size: int) -> LearningRates:
    """Scale BASE_LR, WARMUP_LR and MIN_LR as TRAIN.LR_SCALING says.

    'linear' multiplies them by the total batch (per-device batch x world size x accumulation steps) divided
    by TRAIN.LR_REFERENCE_BATCH (512), as Swin does; 'none' uses them as given, which is what the release
    effectively trained with.
    """
    train = config.TRAIN
    total_batch = config.DATA.BATCH_SIZE * world_size * train.ACCUMULATION_STEPS
    scale = total_batch / train.LR_REFERENCE_BATCH if train.LR_SCALING == "linear" else 1.0
    return LearningRates(base=train.BASE_LR * scale, warmup=train.WARMUP_LR * scale, minimum=train.MIN_LR * scale,
                         scale=scale)


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, updates_per_epoch: int,
                    lrs: LearningRates) -> Scheduler:
    """The schedule TRAIN.LR_SCHEDULER.NAME names, over TRAIN.EPOCHS epochs of ``updates_per_epoch`` updates.

    Warm-up runs for TRAIN.WARMUP_EPOCHS from ``lrs.warmup`` to ``lrs.base``; the decay follows it
    (warm-up as a prefix), ending at ``lrs.minimum`` for cosine and linear.
    """
    train = config.TRAIN
    total = int(train.EPOCHS * updates_per_epoch)
    warmup = int(train.WARMUP_EPOCHS * updates_per_epoch)
    common = {"warmup_t": warmup, "warmup_lr_init": lrs.warmup, "warmup_prefix": True, "t_in_epochs": False}
    name = train.LR_SCHEDULER.NAME  # one of config.SCHEDULERS
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=lrs.minimum, **common)
    if name == "linear":
        # A polynomial decay of power 1 is a straight line from the base rate to the minimum.
        return PolyLRScheduler(optimizer, t_initial=max(total - warmup, 1), power=1.0, lr_min=lrs.minimum, **common)
    decay_t = max(int(train.LR_SCHEDULER.DECAY_EPOCHS * updates_per_epoch), 1)  # "step"
    return StepLRScheduler(optimizer, decay_t=decay_t, decay_rate=train.LR_SCHEDULER.DECAY_RATE, **common)


def scheduled_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's current rate, unscaled: that of the group with the largest ``lr_scale`` (the head's, 1.0,
    under layer-wise decay; every group's without it)."""
    return max(optimizer.param_groups, key=lambda group: group.get("lr_scale", 1.0))["lr"]
