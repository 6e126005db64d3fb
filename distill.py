"""Knowledge distillation as DeiT does it for a network with one head: the teacher, built by name and loaded from a
weights file, and the training loss that mixes the label loss with the teacher's.

The teacher belongs to the loss, not to the training state: no checkpoint holds it, and a resumed run reads its file
again. It runs in eval mode without gradients on the batch the student sees (after mixup), inside the step's
autocast. Under DDP each rank runs its own copy on its own share of the batch; only the student is wrapped.
"""

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from config import DISTILL_TYPES
from models import checkpoint_filter_fn, clean_state_dict
from utils import RunError


class DistillError(RunError):
    """A teacher that cannot be found, built or loaded, or that was trained on other classes than the student's."""


def soft_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's soft loss: KL(teacher || student) of the probabilities softened by ``tau``, summed, times tau^2 and
    divided by the number of logits (B x classes)."""
    kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum",
                  log_target=True)
    return kl * (tau * tau) / student.numel()


def hard_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DeiT's hard loss: cross-entropy of the student against the teacher's top class."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


class DistillationLoss(nn.Module):
    """The training loss of a batch, called as ``criterion(inputs, outputs, targets)``: ``base(outputs, targets)``
    alone without a teacher; with one, DeiT's ``(1 - alpha) x base + alpha x`` the soft or hard loss against the
    teacher's logits on ``inputs``.

    Args:
        base: the label loss, ``base(outputs, targets)`` (cross-entropy with soft targets under mixup).
        teacher: a model in eval mode whose parameters need no gradient, or None.
        kind: "soft" or "hard" with a teacher, "none" without (DISTILL.TYPE, one of config.DISTILL_TYPES).
        alpha: the teacher loss's weight (DISTILL.ALPHA).
        tau: the soft loss's temperature (DISTILL.TAU).
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None = None, kind: str = "none", alpha: float = 0.5,
                 tau: float = 1.0) -> None:
        super().__init__()
        if kind not in DISTILL_TYPES or (teacher is None) != (kind == "none"):
            raise ValueError(f"kind {kind!r} with {'no' if teacher is None else 'a'} teacher: soft and hard need a "
                             "teacher, none takes none")
        self.base = base
        self.teacher = teacher
        self.kind = kind
        self.alpha = alpha
        self.tau = tau
        self.teacher_seconds = 0.0  # since the last take_teacher_seconds()

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        base_loss = self.base(outputs, targets)
        if self.teacher is None:
            return base_loss
        with torch.no_grad():
            started = _clock(inputs.device)
            teacher_logits = self.teacher(inputs)  # (B, classes)
            self.teacher_seconds += _clock(inputs.device) - started
        if self.kind == "soft":
            teacher_loss = soft_distillation_loss(outputs, teacher_logits, self.tau)
        else:
            teacher_loss = hard_distillation_loss(outputs, teacher_logits)
        return base_loss * (1 - self.alpha) + teacher_loss * self.alpha

    def take_teacher_seconds(self) -> float:
        """Seconds the teacher's forward passes took since the last call."""
        seconds, self.teacher_seconds = self.teacher_seconds, 0.0
        return seconds


def _clock(device: torch.device) -> float:
    """The wall clock once the device's queued work is done, so that the teacher's share of a step is real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_teacher_file(path: str) -> None:
    """Refuse, before any work, a DISTILL.TEACHER_CHECKPOINT that is not a file."""
    if not Path(path).is_file():
        raise DistillError(f"DISTILL.TEACHER_CHECKPOINT {path} not found (looked for {Path(path).absolute()}); put "
                           "the teacher's weights there or point the key to them")


def _saved_classes(weights: Mapping[str, torch.Tensor], teacher: nn.Module) -> int | None:
    """The class count of the classifier a teacher's weights hold, or None when they hold none under its name."""
    head = teacher.get_classifier()
    name = next((name for name, module in teacher.named_modules() if module is head), None)
    weight = weights.get(f"{name}.weight")
    return None if weight is None else weight.shape[0]


def build_teacher(name: str, checkpoint: Mapping[str, Any], source: str, num_classes: int,
                  img_size: int | Sequence[int], classes: Sequence[str], device: torch.device,
                  logger: logging.Logger) -> nn.Module:
    """The teacher ``name`` with the weights of ``checkpoint`` (ours, the release's, or a plain state dict, as read
    from ``source``), in eval mode, its parameters without gradients, on ``device``.

    It is built for the student's ``num_classes`` and, when it takes one input size only (as ours and ViTs do), for
    the student's ``img_size`` (our weights of another size are resampled, as for any model of ours).

    Raises:
        DistillError: a model timm cannot build, weights of another class count or other class names than the data's
            (``classes``), or weights that do not fit the model.
    """
    if not timm.is_model(name):
        raise DistillError(f"DISTILL.TEACHER {name!r} is not a model timm can build; give one of timm.list_models() "
                           "(ours included, e.g. strip_mlp_base)")
    fixed_size = getattr(timm.models.get_pretrained_cfg(name), "fixed_input_size", False)
    teacher = timm.create_model(name, num_classes=num_classes, **({"img_size": img_size} if fixed_size else {}))
    saved = _saved_classes(clean_state_dict(checkpoint), teacher)
    if saved is not None and saved != num_classes:
        raise DistillError(f"DISTILL.TEACHER_CHECKPOINT {source} holds a {saved}-class classifier, the student has "
                           f"MODEL.NUM_CLASSES {num_classes}; distil from a teacher trained on the student's classes")
    names = checkpoint.get("classes")  # our checkpoints carry them
    if names and list(names) != list(classes):
        label, (old, new) = next((label, pair) for label, pair in enumerate(itertools.zip_longest(names, classes))
                                 if pair[0] != pair[1])
        raise DistillError(f"DISTILL.TEACHER_CHECKPOINT {source} was trained on other classes than the data holds "
                           f"(label {label}: {old!r} in the teacher's, {new!r} in the data); distil from a teacher "
                           "trained on the student's classes, in the same order")
    try:
        weights = checkpoint_filter_fn(checkpoint, teacher, log=lambda note: logger.info(f"teacher {source}: {note}"))
    except ValueError as e:
        raise DistillError(f"DISTILL.TEACHER_CHECKPOINT {source} does not fit DISTILL.TEACHER {name}: {e}") from None
    teacher.load_state_dict(weights)
    teacher.to(device).eval().requires_grad_(False)
    logger.info(f"teacher {name} from {source}: {sum(p.numel() for p in teacher.parameters()):,} parameters")
    return teacher
