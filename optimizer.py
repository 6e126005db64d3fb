"""Optimisers: AdamW or SGD with Nesterov momentum, with weight decay only where it regularises.

Weight decay is skipped for 1-D parameters (norm scales and shifts), biases, and the relative-position
tables (``embeddings_table``), which the model names through ``no_weight_decay_keywords()``: decaying
them pulls normalisation and position terms towards zero without reducing over-fitting.

With TRAIN.LAYER_DECAY below 1 the parameters are also grouped by depth (BEiT's layer-wise learning-rate decay, as
timm builds it): each group carries an ``lr_scale`` that the schedule multiplies its rate by.
"""

from collections.abc import Iterable

import torch
from timm.optim import param_groups_layer_decay
from torch import nn
from yacs.config import CfgNode


def is_decayed(name: str, param: torch.Tensor, skip_keywords: Iterable[str] = ()) -> bool:
    """Whether weight decay applies to the parameter ``name``."""
    return not (param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in skip_keywords))


def parameter_groups(model: nn.Module, weight_decay: float, skip_keywords: Iterable[str] = ()) -> list[dict]:
    """Split trainable parameters into a decayed group and a group without weight decay.

    Each group names its parameters (``param_names``, saved in the optimiser's state dict), so a resumed run
    matches the saved moments to parameters by name, whatever order the model declares them in.
    """
    skip_keywords = tuple(skip_keywords)
    groups = [{"params": [], "param_names": [], "weight_decay": weight_decay},
              {"params": [], "param_names": [], "weight_decay": 0.0}]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = groups[0] if is_decayed(name, param, skip_keywords) else groups[1]
        group["params"].append(param)
        group["param_names"].append(name)
    return groups


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                       skip_keywords: Iterable[str] = ()) -> list[dict]:
    """Groups by depth and weight decay: timm's ``param_groups_layer_decay``, with this module's weight-decay rule.

    timm reads the model's ``group_matcher(coarse=False)`` (the stem, each block, the head); of n groups in forward
    order, group i trains at ``layer_decay ** (n - 1 - i)`` of the scheduled rate (``lr_scale``), so the head keeps
    the full rate and the stem gets the smallest. Frozen parameters are left out, as in :func:`parameter_groups`,
    and each group names its parameters (``param_names``) for resuming.
    """
    # timm matches these with fnmatch against whole names, and decays what is neither 1-D nor matched.
    no_decay = ["*.bias", *(f"*{keyword}*" for keyword in skip_keywords)]
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay,
                                      layer_decay=layer_decay)
    names = {id(param): name for name, param in model.named_parameters()}
    for group in groups:
        group["param_names"] = [names[id(param)] for param in group["params"]]
    return groups


def build_optimizer(config: CfgNode, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimiser TRAIN.OPTIMIZER names, at learning rate ``lr`` (the effective, possibly scaled, BASE_LR), for
    the trainable parameters, grouped by weight decay and, with TRAIN.LAYER_DECAY below 1, by depth."""
    skip_keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else ()
    train = config.TRAIN
    if train.LAYER_DECAY < 1.0:
        groups = layer_decay_groups(model, train.WEIGHT_DECAY, train.LAYER_DECAY, skip_keywords)
    else:
        groups = parameter_groups(model, train.WEIGHT_DECAY, skip_keywords)
    opt = train.OPTIMIZER
    if opt.NAME == "adamw":  # else "sgd", the other of config.OPTIMIZERS
        # The fused CUDA kernel updates every parameter in one launch; it exists for CUDA tensors only.
        fused = all(p.is_cuda for group in groups for p in group["params"]) or None
        return torch.optim.AdamW(groups, lr=lr, eps=opt.EPS, betas=tuple(opt.BETAS), fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=opt.MOMENTUM, nesterov=True)
