"""One training recipe for the range test, every trial and the final run: the job's ``train`` section.

:class:`Stepper` does an optimizer step the recipe's way: ``gradient_accumulation_steps`` batches
forward and backward under the recipe's precision (``bf16`` autocast, or ``fp16`` autocast with a
gradient scaler), then the gradients' global norm clipped to ``max_grad_norm``, then the step. The
range test, the trial loop and the final run all step through it, so the LR a search hands over was
found with the clipping, precision and accumulation the user's run trains with (and the export
writes the same three into ``TrainingArguments`` or the torch snippet).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

import torch
from torch import nn

from lrsearch.optim.batches import forward

__all__ = ["PRECISIONS", "Recipe", "Stepper", "autocast_for"]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Recipe:
    """Gradient clipping, precision and accumulation (``None`` ``max_grad_norm``: no clipping)."""

    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    accumulation_steps: int = 1
    recompute_bn: bool = True

    @classmethod
    def of(cls, train: Any, accumulation_steps: int | None = None) -> Recipe:
        """From a job's ``train`` section (``accumulation_steps`` overrides its own)."""
        return cls(train.max_grad_norm, train.precision,
                   accumulation_steps or train.gradient_accumulation_steps, train.recompute_bn)

    def to_dict(self) -> dict[str, Any]:
        """The recipe in the job file's names (what a best config records; ``recompute_bn`` only
        when off, its default being on)."""
        out = {"max_grad_norm": self.max_grad_norm, "precision": self.precision,
               "gradient_accumulation_steps": self.accumulation_steps}
        if not self.recompute_bn:
            out["recompute_bn"] = False
        return out


def autocast_for(precision: str, device: torch.device | str) -> Callable[[], Any]:
    """A zero-argument factory of the autocast context ``precision`` trains under on ``device``.

    Raises:
        ValueError: ``fp16`` off CUDA, or an unknown precision.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; precision must be one of "
                         f"{', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"train.precision: got 'fp16' on device {str(device)!r}; fp16 needs a CUDA "
                         "GPU (resources.gpu > 0); on the CPU use bf16 or fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device.type, dtype=dtype)


class Stepper:
    """Optimizer steps of one model the recipe's way.

    Use ``loss = stepper.backward(batches)`` (the step's mean loss over its batches, gradients
    accumulated), look at the loss (a divergence stop skips the step), then ``stepper.step()``.
    """

    def __init__(self, recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: Callable, device: torch.device | str) -> None:
        self.recipe, self.model, self.optimizer, self.criterion = recipe, model, optimizer, criterion
        self.device = torch.device(device)
        self.autocast = autocast_for(recipe.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if recipe.precision == "fp16" else None

    def batches(self, loader: Iterable) -> Iterator[list[Any]]:
        """The loader's batches in groups of ``accumulation_steps``; a last partial group is dropped
        (every optimizer step sees as many examples)."""
        it, n = iter(loader), self.recipe.accumulation_steps
        while len(group := list(islice(it, n))) == n:
            yield group

    def backward(self, batches: list[Any]) -> float:
        """Zero the gradients, then forward and backward each batch (its loss / len(batches)).
        Returns the step's mean loss (NaN or inf when a batch's is)."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            with self.autocast():
                loss = forward(self.model, self.criterion, batch, self.device) / len(batches)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += float(loss.detach())
        return total

    def step(self) -> float | None:
        """Clip the gradients (when the recipe does) and take the optimizer step. Returns the
        gradients' global norm before clipping, or ``None`` without clipping."""
        norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.max_grad_norm is not None:
            norm = float(nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.recipe.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return norm if norm is None or math.isfinite(norm) else float("inf")

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
