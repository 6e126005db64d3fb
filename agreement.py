"""Agreement across ranks before each optimiser update: whether a loss was NaN or infinite, how many images could
not be read, and whether a rank was asked to stop.

Without it, a rank that fails or stops alone leaves the others waiting in the gradient all-reduce. So each
micro-step notes its loss and its batch's unreadable images, and before the backward pass of an update (the one
that all-reduces gradients) one small all-reduce lets every rank take the same decision, with the same message.
Losses stay on the device until then, so a micro-step without an update costs no host synchronisation.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from distributed import DistEnv, all_reduce_sum
from utils import RunError

if TYPE_CHECKING:
    from data import Sample, UnreadableImages


class NonFiniteLossError(RunError):
    """The loss or the gradient became NaN or infinite; training stops before the bad update touches the
    weights, on every rank with the same message."""


@dataclass(frozen=True)
class Interruptions:
    """How an epoch may pause before its end: when any rank was asked to stop (a preemption signal), every
    rank finishes its update and the epoch ends there; and a checkpoint every ``save_every`` updates.

    Attributes:
        stop_requested: whether this rank was asked to stop.
        save: writes the mid-epoch checkpoint (on rank 0) after the given number of the epoch's micro-steps.
        save_every: updates between checkpoints; 0 writes none (a stop always writes one).
    """

    stop_requested: Callable[[], bool] = lambda: False
    save: Callable[[int], None] = lambda steps: None
    save_every: int = 0

    def save_due(self, global_step: int) -> bool:
        """Whether the run's ``global_step``-th update is followed by a checkpoint."""
        return self.save_every > 0 and global_step % self.save_every == 0


class UpdateAgreement:
    """The agreement of one training epoch.

    Args:
        env: this process's place among the ranks.
        unreadable: what DATA.BAD_IMAGE allows; it logs each unreadable file once.
        interruptions: its ``stop_requested`` says whether this rank was asked to stop.
        epoch: the epoch, for messages.
        num_steps: the epoch's micro-steps; the 1% limit on unreadable images counts the epoch's images from it.
        logger: where unreadable files are logged.
    """

    def __init__(self, env: DistEnv, unreadable: "UnreadableImages", interruptions: Interruptions, epoch: int,
                 num_steps: int, logger: logging.Logger) -> None:
        self.env = env
        self.policy = unreadable
        self.stop_requested = interruptions.stop_requested
        self.epoch = epoch
        self.num_steps = num_steps
        self.logger = logger
        self.group_bad_loss = torch.zeros((), dtype=torch.float64, device=env.device)  # first non-finite loss, or 0
        self.group_unreadable: list[str] = []
        self.unreadable = 0  # the epoch's unreadable images so far, summed over ranks

    def before_backward(self, batch: "Sample", loss: torch.Tensor, is_update: bool, where: str) -> bool:
        """Note a micro-step's loss and its batch's unreadable images; on the last micro-step of an update, agree
        with every rank on the losses, unreadable images and stop requests of the update's micro-steps.

        Returns:
            Whether any rank was asked to stop (after this update); False for a micro-step that is not an update's.

        Raises:
            NonFiniteLossError: a loss of the update's micro-steps was NaN or infinite on some rank.
            DataError: unreadable images that DATA.BAD_IMAGE or the 1% limit do not allow.
        """
        loss = loss.detach().double()
        first_bad = torch.isfinite(loss) | (self.group_bad_loss != 0)
        self.group_bad_loss = torch.where(first_bad, self.group_bad_loss, loss)
        self.group_unreadable += self.policy.note(batch.bad, self.logger)
        if not is_update:
            return False
        env = self.env
        health = torch.zeros(env.world_size + 2, dtype=torch.float64, device=env.device)
        health[env.rank] = self.group_bad_loss
        health[-2] = len(self.group_unreadable)
        health[-1] = float(self.stop_requested())
        *losses, unreadable, stops = all_reduce_sum(health, env).tolist()
        bad = [rank for rank, value in enumerate(losses) if not math.isfinite(value)]
        if bad:
            raise NonFiniteLossError(
                f"loss is {losses[bad[0]]} at {where} on rank {', '.join(map(str, bad))}; training stopped, "
                "checkpoints already written are intact; lower TRAIN.BASE_LR, set TRAIN.CLIP_GRAD, or use "
                "AMP.DTYPE bfloat16")
        self.policy.check(self.group_unreadable, int(unreadable), where)
        self.unreadable += int(unreadable)
        epoch_images = self.num_steps * batch.image.shape[0] * env.world_size
        self.policy.check_fraction(self.unreadable, epoch_images, f"epoch {self.epoch}")
        self.group_unreadable = []
        return stops > 0
