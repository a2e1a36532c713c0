"""Pure schedule math: the factor of the peak LR at optimizer step ``step`` (0-based).

Torch-free. :mod:`lrsearch.optim.schedule_factories` binds these with :func:`functools.partial` and wraps
them in ``LambdaLR``; they are module-level functions with keyword-only parameters so that such a
partial pickles (Ray ships schedulers to workers, no closures or lambdas allowed).
"""

from __future__ import annotations

import math

__all__ = ["constant_factor", "cosine_factor", "linear_factor", "stlr_factor", "wsd_factor"]


def linear_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup 0 -> 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    Same arithmetic as ``transformers.get_linear_schedule_with_warmup``.
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then half a cosine from 1 down to ``min_lr_ratio`` at ``total_steps``.

    With ``min_lr_ratio=0`` this is ``transformers.get_cosine_schedule_with_warmup``.
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    progress = min(progress, 1.0)  # hold the floor if stepped past the budget
    factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if min_lr_ratio == 0.0:
        return factor
    return factor * (1.0 - min_lr_ratio) + min_lr_ratio


def stlr_factor(step: int, *, total_steps: int, cut_frac: float, ratio: float) -> float:
    """ULMFiT's slanted triangular LR (Howard & Ruder, 2018, eq. 3).

    Rises linearly from ``1/ratio`` to 1 over the first ``cut = floor(total*cut_frac)`` steps, then
    falls linearly back to ``1/ratio`` at ``total_steps``.
    """
    cut = max(1, math.floor(total_steps * cut_frac))
    if step < cut:
        p = step / cut
    else:
        p = 1.0 - (step - cut) / max(1, total_steps - cut)
    p = max(0.0, p)
    return (1.0 + p * (ratio - 1.0)) / ratio


def constant_factor(step: int, *, warmup_steps: int) -> float:
    """Optional linear warmup, then constant (``transformers.get_constant_schedule_with_warmup``)."""
    if step < warmup_steps:
        return float(step) / float(max(1.0, warmup_steps))
    return 1.0


def wsd_factor(step: int, *, warmup_steps: int, decay_steps: int, total_steps: int, decay_type: str,
               min_lr_ratio: float) -> float:
    """Warmup-stable-decay: linear warmup, flat at 1, then a cooldown to ``min_lr_ratio`` over the
    last ``decay_steps`` steps (``linear``, ``cosine`` or ``1-sqrt``; Hägele et al., 2024).

    Same arithmetic as ``transformers.get_wsd_schedule`` with ``warmup_type="linear"`` and
    ``num_training_steps=total_steps``.
    """
    stable_end = total_steps - decay_steps
    if step < warmup_steps:
        factor = float(step) / float(max(1, warmup_steps))
    elif step < stable_end:
        return 1.0
    elif step < total_steps:
        progress = float(step - stable_end) / float(max(1, decay_steps))
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # 1-sqrt
            factor = 1.0 - math.sqrt(progress)
    else:
        return min_lr_ratio
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
