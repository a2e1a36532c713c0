"""The torch edge of the schedules: one factory per registered schedule.

Each factory has the signature ``factory(optimizer, total_steps, params) -> LRScheduler``, where
``params`` holds every parameter of the schedule, defaults filled in and validated by
:func:`lrsearch.optim.schedules.resolve_params`. Schedules that PyTorch ships are PyTorch's own classes;
the others are ``LambdaLR`` over the pure factor functions of :mod:`lrsearch.optim.schedule_math`, bound
with :func:`functools.partial` so that the scheduler pickles.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LambdaLR,
    LRScheduler,
    OneCycleLR,
    StepLR,
)

from lrsearch.optim.schedule_math import (
    constant_factor,
    cosine_factor,
    linear_factor,
    stlr_factor,
    wsd_factor,
)

__all__ = [
    "build_constant",
    "build_cosine",
    "build_cosine_annealing",
    "build_cosine_restarts",
    "build_exponential",
    "build_linear",
    "build_one_cycle",
    "build_step",
    "build_stlr",
    "build_wsd",
]


def _warmup_steps(params: Mapping[str, Any], total_steps: int) -> int:
    return int(params["warmup_frac"] * total_steps)


def _peaks(optimizer: Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


def _single_floor(name: str, optimizer: Optimizer, ratio: float) -> float:
    # torch's cosine schedulers take one absolute eta_min for all groups.
    peaks = _peaks(optimizer)
    if ratio > 0.0 and len(set(peaks)) > 1:
        raise ValueError(
            f"schedule {name!r}: min_lr_ratio={ratio!r} needs one peak LR for all parameter groups "
            f"(got {sorted(set(peaks))}); use min_lr_ratio=0 or schedule 'cosine' with warmup_frac=0"
        )
    return ratio * peaks[0]


def build_linear(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    return LambdaLR(
        opt, partial(linear_factor, warmup_steps=_warmup_steps(p, total), total_steps=total)
    )


def build_cosine(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    fn = partial(
        cosine_factor,
        warmup_steps=_warmup_steps(p, total),
        total_steps=total,
        min_lr_ratio=float(p["min_lr_ratio"]),
    )
    return LambdaLR(opt, fn)


def build_stlr(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    fn = partial(stlr_factor, total_steps=total, cut_frac=p["cut_frac"], ratio=p["ratio"])
    return LambdaLR(opt, fn)


def build_cosine_annealing(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    eta_min = _single_floor("cosine_annealing", opt, p["min_lr_ratio"])
    return CosineAnnealingLR(opt, T_max=total, eta_min=eta_min)


def build_cosine_restarts(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    eta_min = _single_floor("cosine_restarts", opt, p["min_lr_ratio"])
    return CosineAnnealingWarmRestarts(opt, T_0=p["T_0"], T_mult=p["T_mult"], eta_min=eta_min)


def build_exponential(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    return ExponentialLR(opt, gamma=p["gamma"])


def build_step(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    return StepLR(opt, step_size=p["step_size"], gamma=p["gamma"])


def build_one_cycle(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    return OneCycleLR(
        opt,
        max_lr=_peaks(opt),
        total_steps=total,
        pct_start=p["pct_start"],
        anneal_strategy="cos",
        div_factor=p["div_factor"],
        final_div_factor=p["final_div_factor"],
        # lrsearch tunes the LR only; momentum/betas stay as the optimizer has them.
        cycle_momentum=False,
    )


def build_constant(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    return LambdaLR(opt, partial(constant_factor, warmup_steps=_warmup_steps(p, total)))


def build_wsd(opt: Optimizer, total: int, p: dict[str, Any]) -> LRScheduler:
    fn = partial(wsd_factor, warmup_steps=_warmup_steps(p, total), decay_steps=int(p["decay_frac"] * total),
                 total_steps=total, decay_type=p["decay_type"], min_lr_ratio=float(p["min_lr_ratio"]))
    return LambdaLR(opt, fn)
