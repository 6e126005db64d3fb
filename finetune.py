"""Fine-tuning controls: the network's layer groups, and the learning-rate scale each group trains at.

The groups are the model's own ``group_matcher`` (timm's convention: the stem, the blocks in forward order with the
merging and skip convolutions beside the first block of the stage they feed, then the final norm and the head),
read through timm's ``group_parameters``: the same groups that timm's layer-wise learning-rate decay uses.
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


def layer_scales(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, float]]:
    """(label, learning-rate scale) of each layer group (see :func:`layer_groups`) the optimiser trains, in forward
    order; a group without ``lr_scale`` trains at 1."""
    scales = {name: group.get("lr_scale", 1.0) for group in optimizer.param_groups for name in group["param_names"]}
    held = ((label, [name for name in names if name in scales]) for label, names in layer_groups(model))
    return [(label, scales[names[0]]) for label, names in held if names]
