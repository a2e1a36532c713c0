"""Optimizers from the job's ``optimizer`` section, with optional layer-wise LR decay."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lrsearch.config import OptimizerConfig


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    layer_groups: Callable[[nn.Module], list[list[nn.Parameter]]] | None = None,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Parameter groups with per-layer peak LRs and weight decay only where it belongs.

    With ``layer_decay < 1`` (ULMFiT's discriminative fine-tuning) the last group (the head) gets
    ``lr`` and each group below it ``layer_decay`` times the one above. Biases and normalisation
    weights (1-d tensors) get no weight decay, as in BERT fine-tuning.
    """
    if layer_decay != 1.0 and layer_groups is not None:
        layers = [[p for p in group if p.requires_grad] for group in layer_groups(model)]
    else:
        layers = [[p for p in model.parameters() if p.requires_grad]]
    depth = len(layers)
    groups = []
    for i, params in enumerate(layers):
        group_lr = lr * layer_decay ** (depth - 1 - i)
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": group_lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": group_lr, "weight_decay": 0.0})
    return groups


def build_optimizer(
    cfg: OptimizerConfig,
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float | None = None,
    layer_groups: Callable[[nn.Module], list[list[nn.Parameter]]] | None = None,
    layer_decay: float = 1.0,
) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ``model`` at peak LR ``lr`` (``weight_decay`` overrides cfg's)."""
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    groups = param_groups(model, lr, wd, layer_groups=layer_groups, layer_decay=layer_decay)
    return optimizer_over(cfg, groups, lr)


def optimizer_over(cfg: OptimizerConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names over ready parameter groups (each with its own ``lr``, or ``lr``)."""
    name = cfg.name.value
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
