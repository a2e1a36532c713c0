"""The training engine: the one epoch loop every training run of a task goes through.

:func:`fit` trains a model over a :class:`Horizon` the recipe's way (:class:`~lrsearch.optim.recipe.Stepper`:
clipping, precision, accumulation), and does, once for every caller:

- each epoch's batch order from the seed and the epoch only (:func:`epoch_seed`), so a resumed or
  replayed run sees the batches it would have seen;
- the divergence stop at every optimizer step (:class:`~lrsearch.optim.divergence.DivergenceMonitor`);
- the evaluation after each epoch in eval mode (schedule-free's averaged weights; BatchNorm's
  statistics recomputed where the recipe asks).

What an epoch produced goes to a :class:`Sink`: a search's trial reports it to Ray Tune
(:class:`lrsearch.engine.trial.TrialSink`), a final run logs and checkpoints it (``lrsearch.final``).
Checkpoints have one format (:func:`checkpoint_state`, :func:`load_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lrsearch.optim.divergence import DivergenceMonitor
from lrsearch.optim.optimizers import eval_mode, is_schedule_free, train_mode
from lrsearch.optim.recipe import Recipe, Stepper
from lrsearch.tasks import Task, evaluate, reseed

__all__ = ["EpochEnd", "Horizon", "Sink", "Training", "checkpoint_state", "cooldown_branch", "epoch_seed", "fit",
           "load_state", "train_epoch"]


@dataclass(frozen=True)
class Training:
    """How every run of a job trains: the recipe (``train``), the optimizer section, the seed and
    the divergence stop's settings (``search``). Its drivers derive it from the job's sections."""

    recipe: Recipe
    optimizer: Any
    seed: int
    diverge_factor: float
    diverge_smooth: float

    @classmethod
    def of(cls, train: Any, optimizer: Any, search: Any) -> Training:
        """From a job's ``train``, ``optimizer`` and ``search`` sections."""
        return cls(Recipe.of(train), optimizer, search.seed, search.diverge_factor, search.diverge_smooth)

    def monitor(self) -> DivergenceMonitor:
        """A fresh divergence stop: NaN/inf, or a smoothed loss above ``diverge_factor`` x its first."""
        return DivergenceMonitor(factor=self.diverge_factor, smooth=self.diverge_smooth, reference="first")


@dataclass(frozen=True)
class Horizon:
    """A run's length in optimizer steps: ``total_steps``, ``steps_per_epoch`` a full epoch."""

    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of_epochs(cls, steps_per_epoch: int, epochs: int) -> Horizon:
        return cls(steps_per_epoch, steps_per_epoch * epochs)

    @property
    def epochs(self) -> int:
        """Epochs the run takes, the last one short when ``total_steps`` ends mid-epoch."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of epoch ``epoch`` (from 0)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch order: the run's seed and the epoch only, not which runs
    this (reused) worker did before, nor whether the run was resumed."""
    return seed * 1_000_003 + epoch


@dataclass
class EpochEnd:
    """What one epoch (``epoch``, from 1) produced: its mean train loss, the LR of every optimizer
    step, whether it diverged, and the evaluation's scores (``None`` when it diverged or was
    replayed unevaluated)."""

    epoch: int
    train_loss: float
    lrs: list[float] = field(default_factory=list)
    diverged: bool = False
    scores: dict[str, float] | None = None


class Sink(Protocol):
    """Where :func:`fit` hands each epoch."""

    def replaying(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (from 1) is retrained only to rebuild a state: no evaluation."""

    def end_epoch(self, end: EpochEnd) -> bool:
        """Take the epoch; True stops the run (a diverged epoch stops it anyway)."""


def _peak_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(float(g["lr"]) for g in optimizer.param_groups)


def train_epoch(stepper: Stepper, scheduler, task: Task, monitor: DivergenceMonitor,
                max_steps: int) -> tuple[float, int, bool, list[float]]:
    """One epoch of at most ``max_steps`` optimizer steps, each the recipe's (``stepper``):
    ``(mean train loss, steps, diverged, LR at every step)``; stops at divergence."""
    stepper.model.train()
    train_mode(stepper.optimizer)  # schedule-free: back to its training weights
    loss_sum, steps, lrs = 0.0, 0, []
    for batches in stepper.batches(task.train_loader):
        if steps >= max_steps:
            break
        lrs.append(_peak_lr(stepper.optimizer))
        value = stepper.backward(batches)
        if monitor.update(value):
            # no finite loss yet: report a huge one, never a perfect 0
            return (loss_sum / steps if steps else 1e9), steps, True, lrs
        stepper.step()
        scheduler.step()
        steps += 1
        loss_sum += value
    return loss_sum / max(1, steps), steps, False, lrs


def fit(task: Task, stepper: Stepper, scheduler, monitor: DivergenceMonitor, horizon: Horizon, *,
        seed: int, sink: Sink, start_epoch: int = 0) -> EpochEnd | None:
    """Train from ``start_epoch`` to the end of ``horizon`` (or until ``sink`` stops it, or a
    divergence), evaluating after each epoch. Returns the last epoch's end (``None``: none ran)."""
    last = None
    for epoch in range(start_epoch, horizon.epochs):
        reseed(task, epoch_seed(seed, epoch))
        train_loss, _, diverged, lrs = train_epoch(stepper, scheduler, task, monitor, horizon.steps_in(epoch))
        last = EpochEnd(epoch + 1, train_loss, lrs, diverged)
        if not diverged and not sink.replaying(epoch + 1):
            last.scores = _evaluate(stepper, task)
        if sink.end_epoch(last) or diverged:
            break
    return last


def _evaluate(stepper: Stepper, task: Task) -> dict[str, float]:
    # schedule-free: its averaged weights; BatchNorm statistics recomputed where the recipe asks
    eval_mode(stepper.optimizer, stepper.model, task.train_loader, device=stepper.device,
              recompute_bn=stepper.recipe.recompute_bn)
    return evaluate(stepper.model, task, stepper.device, autocast=stepper.autocast)


class LinearCooldown:
    """The LR of every parameter group from where it stands to 0 over ``steps`` optimizer steps
    (one :meth:`step` after each, as a scheduler)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self.optimizer, self.steps, self.done = optimizer, steps, 0
        self.peaks = [float(g["lr"]) for g in optimizer.param_groups]

    def step(self) -> None:
        self.done += 1
        factor = max(0.0, 1.0 - self.done / self.steps)
        for group, peak in zip(self.optimizer.param_groups, self.peaks, strict=True):
            group["lr"] = peak * factor


def cooldown_branch(task: Task, stepper: Stepper, monitor: DivergenceMonitor, steps: int, *, seed: int,
                    epoch: int) -> dict[str, float] | None:
    """What the run would score had it ended after ``epoch`` epochs: ``steps`` optimizer steps with
    the LR cooled linearly to 0 (on the batches epoch ``epoch + 1`` would see), then the evaluation.
    ``None`` when the branch diverged. It changes the model and the optimizer: branch from a copy
    (a checkpoint loaded afresh). A schedule-free optimizer needs no cooldown (its averaged weights
    are the end of the run): it is evaluated as it stands."""
    if steps > 0 and not is_schedule_free(stepper.optimizer):
        reseed(task, epoch_seed(seed, epoch))
        _, _, diverged, _ = train_epoch(stepper, LinearCooldown(stepper.optimizer, steps), task, monitor, steps)
        if diverged:
            return None
    return _evaluate(stepper, task)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What fine-tuning changes: the parameters that require gradients, and the buffers (norm
    statistics). Frozen weights come back from ``task.build_model()``."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def checkpoint_state(epoch: int, *, model: torch.nn.Module | None, optimizer=None, scheduler=None,
                     monitor: DivergenceMonitor | None = None, tracked: dict[str, Any] | None = None,
                     steps: int = 0, finished: bool = False, **extra: Any) -> dict[str, Any]:
    """A checkpoint after ``epoch``: the model's trainable weights, and (unless ``finished``: a
    done run needs only its weights) the optimizer, schedule, divergence monitor and ``tracked``
    objects' states. ``extra`` (JSON-able values) rides along."""
    state: dict[str, Any] = {"epoch": epoch, "steps": steps, **extra}
    if model is not None:
        state["model"] = trainable_state(model)
    if not finished:
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if monitor is not None:
            state["monitor"] = monitor.state_dict()
        state["tracked"] = {k: v.state_dict() for k, v in (tracked or {}).items()}
    return state


def load_state(state: dict[str, Any], stepper: Stepper, scheduler, monitor: DivergenceMonitor,
               tracked: dict[str, Any] | None = None) -> None:
    """Put a :func:`checkpoint_state` back: weights, and (when there) optimizer, schedule,
    divergence monitor and tracked objects (``tracked`` by name; default: the stepper's scaler)."""
    stepper.model.load_state_dict(state["model"], strict=False)  # frozen weights: as built
    if "optimizer" in state:  # not in a finished run's last checkpoint
        stepper.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        monitor.load_state_dict(state["monitor"])
        for name, obj in (tracked or {"stepper": stepper}).items():
            if name in state.get("tracked", {}):
                obj.load_state_dict(state["tracked"][name])
