"""Optimizers from the job's ``optimizer`` section, with optional layer-wise LR decay.

Schedule-free AdamW (``adamw_schedulefree``) keeps two sets of weights: it trains at one point and
evaluates at another (the average). :func:`train_mode` and :func:`eval_mode` switch between them and
do nothing for other optimizers; every loop of lrsearch calls ``eval_mode`` before it evaluates or
checkpoints and ``train_mode`` before it steps again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrsearch.errors import ConfigError
from lrsearch.optim.batches import move_to_device

if TYPE_CHECKING:  # the job's section, read here, never built
    from lrsearch.job.config import OptimizerConfig


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


def for_schedule(cfg: OptimizerConfig, schedule: str) -> OptimizerConfig:
    """The optimizer a trial of ``schedule`` trains with: the job's, except that the
    ``schedule_free`` arm of a search trains AdamWScheduleFree with the job's betas, eps and weight
    decay (it replaces the schedule's decay by averaging)."""
    if schedule != "schedule_free" or cfg.name == "adamw_schedulefree":
        return cfg
    if cfg.name == "sgd":
        raise ConfigError("space: schedule 'schedule_free' trains AdamWScheduleFree; it needs an Adam-family "
                          "optimizer (optimizer.name: adamw, adam or adamw_schedulefree), got sgd")
    return type(cfg).model_validate({**cfg.model_dump(), "name": "adamw_schedulefree"})


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
    if name == "adamw_schedulefree":
        import schedulefree

        # warmup comes from the LR schedule (constant + warmup_frac), as for every optimizer
        opt = schedulefree.AdamWScheduleFree(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, warmup_steps=0)
        opt.train()  # it is built in eval mode and refuses to step there
        return opt
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def is_schedule_free(optimizer: object) -> bool:
    """Whether ``optimizer`` (or the optimizer a wrapper holds) has train and eval modes."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


def train_mode(optimizer: object) -> None:
    """Ready a schedule-free optimizer to step again (its training weights); no-op otherwise."""
    if is_schedule_free(optimizer):
        getattr(optimizer, "optimizer", optimizer).train()


def eval_mode(optimizer: object, model: nn.Module | None = None, batches=None, *,
              device: torch.device | str = "cpu", recompute_bn: bool = False, max_batches: int = 32) -> None:
    """Ready ``model`` for evaluation: a schedule-free optimizer's evaluation weights (the average)
    go into it (other optimizers: nothing), and BatchNorm's statistics are recomputed over
    ``batches`` (the train loader) for a schedule-free optimizer or with ``recompute_bn``.

    BatchNorm caveat (schedulefree's README): the running statistics were gathered at the training
    weights, not at the average, so they are recomputed at the average.
    """
    schedule_free = is_schedule_free(optimizer)
    if schedule_free:
        getattr(optimizer, "optimizer", optimizer).eval()
    if (schedule_free or recompute_bn) and model is not None and batches is not None:
        recompute_batchnorm(model, batches, device=device, max_batches=max_batches)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches, *, device: torch.device | str = "cpu",
                        max_batches: int = 32) -> None:
    """BatchNorm running statistics of ``model`` at its current weights: a plain mean over up to
    ``max_batches`` of ``batches``, forward only in train mode (no gradients); momenta kept."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return

    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        inputs, _ = move_to_device(batch, device)
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
