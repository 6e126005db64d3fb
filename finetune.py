"""Fine-tuning controls: the network's layer groups, freezing the first of them (TRAIN.FREEZE), and frozen BatchNorm
layers that keep their running statistics.

The groups are the model's own ``group_matcher`` (timm's convention: the stem, the blocks in forward order with the
merging and skip convolutions beside the first block of the stage they feed, then the final norm and the head),
read through timm's ``group_parameters``: the same groups that timm's layer-wise learning-rate decay uses.

Freezing sets ``requires_grad`` False, so the optimiser never receives those parameters and DistributedDataParallel
neither waits for their gradients nor needs ``find_unused_parameters``. A frozen BatchNorm layer is also put in eval
mode after every ``model.train()`` (:func:`set_frozen_norms_eval`): it normalises with its running statistics and
leaves them, and ``num_batches_tracked``, unchanged. timm's ``freeze`` would instead swap such layers for
``FrozenBatchNorm2d``, which drops ``num_batches_tracked`` from the state dict and turns the scale and shift into
buffers, so checkpoints of a frozen run would no longer load into the plain network; a module in eval mode keeps
every state-dict key.
"""

import re

import torch
from timm.models import group_parameters
from torch import nn


def _label(index: int, count: int, names: list[str], coarse: bool) -> str:
    if index == 0:
        return "stem"
    if index == count - 1:
        return "head"
    if coarse:
        return f"stage{index}"
    return next(match.group(0) for name in names if (match := re.match(r"blocks\d+\.\d+", name)))


def layer_groups(model: nn.Module, coarse: bool = False) -> list[tuple[str, list[str]]]:
    """The model's parameter groups in forward order, each as (label, parameter names).

    Labels: ``stem``; then ``stage1``..``stage4`` when ``coarse``, else each block's name (``blocks3.1``); then
    ``head`` (the final norm and the classifier).
    """
    groups = list(group_parameters(model, model.group_matcher(coarse=coarse)).values())
    return [(_label(i, len(groups), names, coarse), names) for i, names in enumerate(groups)]


def frozen_parameter_names(model: nn.Module, mode: str) -> list[str]:
    """The parameters that TRAIN.FREEZE ``mode`` (one of config.FREEZE_MODES) freezes: none for ""; all but the
    classifier's for "backbone" (a linear probe on fixed features); for "stageK" the stem's and those of stages 1..K,
    with the merging and skip layers that feed them."""
    if not mode:
        return []
    if mode == "backbone":
        classifier = {id(p) for p in model.get_classifier().parameters()}
        return [name for name, p in model.named_parameters() if id(p) not in classifier]
    frozen = []
    for label, names in layer_groups(model, coarse=True):
        frozen += names
        if label == mode:
            break
    return frozen


def freeze(model: nn.Module, mode: str) -> list[str]:
    """Freeze what TRAIN.FREEZE ``mode`` names (``requires_grad`` False); returns the frozen parameter names.

    Call it before the optimiser, DistributedDataParallel and the EMA copy are built, so none of them holds a
    frozen parameter as trainable.
    """
    names = frozen_parameter_names(model, mode)
    for name in names:
        model.get_parameter(name).requires_grad_(False)
    return names


def frozen_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm layer whose scale and shift are frozen (an affine BatchNorm only: one
    without parameters cannot tell)."""
    found = []
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            found.append((name, module))
    return found


def set_frozen_norms_eval(model: nn.Module) -> None:
    """Put the frozen BatchNorm layers in eval mode; call it after every ``model.train()``, which undoes it."""
    for _, module in frozen_norms(model):
        module.eval()


def layer_scales(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, float]]:
    """(label, learning-rate scale) of each layer group (see :func:`layer_groups`) the optimiser trains, in forward
    order; a group without ``lr_scale`` trains at 1."""
    scales = {name: group.get("lr_scale", 1.0) for group in optimizer.param_groups for name in group["param_names"]}
    held = ((label, [name for name in names if name in scales]) for label, names in layer_groups(model))
    return [(label, scales[names[0]]) for label, names in held if names]


def freezing_summary(model: nn.Module, mode: str) -> str:
    """One log line: what TRAIN.FREEZE ``mode`` froze, and how many parameters stay trainable."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    modules = list(dict.fromkeys(name.split(".")[0] for name in frozen))  # top-level modules, in order
    count = sum(model.get_parameter(name).numel() for name in frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"TRAIN.FREEZE {mode}: {count:,} parameters frozen ({', '.join(modules)}), {trainable:,} trainable; "
            f"{len(frozen_norms(model))} frozen BatchNorm layers stay in eval mode")
