"""The LR range test (Smith, 2017): sweep the LR up over a short run and read the loss curve.

:func:`lr_range_test` runs the sweep and returns a :class:`RangeTestResult`; the suggestions and the
``(low, high)`` bounds for the ``max_lr`` search are pure functions of that result
(:mod:`lrsearch.range_test.suggestions`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from lrsearch.optim.batches import forward
from lrsearch.optim.divergence import DivergenceMonitor
from lrsearch.optim.recipe import Recipe, Stepper, autocast_for
from lrsearch.range_test.suggestions import (
    MIN_DROP,
    NOISE_Z,
    SUGGESTION_METHODS,
    Curve,
    bounds_from_curve,
    no_descent,
    suggest_lr,
)

__all__ = ["SUGGESTION_METHODS", "RangeTestResult", "lr_range_test"]

MODES = ("exp", "linear")


# --------------------------------------------------------------------------------------------
# Result and suggestions (pure functions of the recorded curve)
# --------------------------------------------------------------------------------------------


@dataclass
class RangeTestResult:
    """What a range test recorded.

    Attributes:
        lrs: the LR of each completed step (the peak group's LR when groups differ).
        losses: bias-corrected EMA of the loss at each step.
        raw_losses: the loss at each step as measured (training batch, or validation set).
        stop_reason: ``"completed"``, ``"diverged"`` (smoothed loss above ``diverge_factor`` x best)
            or ``"non_finite"`` (loss was NaN or inf; that step is not recorded).
        diverged_lr: the LR at which the test stopped early, or ``None``.
        settings: the arguments the test ran with.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    stop_reason: str = "completed"
    diverged_lr: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    # ---- suggestions -------------------------------------------------------------------------

    def suggest(self, method: str = "steepest") -> float | None:
        """One LR suggestion; ``None`` when the curve shows no descent or is too flat for the method.

        Methods:
            - ``steepest``: where the smoothed loss falls fastest against log(lr), on the descent
              only (the points up to and including the lowest smoothed loss), ignoring the first
              10 % and last 5 % of the curve (the noisy ends).
            - ``valley``: the middle, on the log axis, of the descent: from the last point within
              10 % of the total drop of the starting plateau to the lowest point.
            - ``minimum``: the LR at the lowest smoothed loss, divided by 10.
            - ``slide``: walking back from the right end of the curve, the first point where the
              slope over a window of points flattens below 5 % of the loss range per decade.

        Every method returns an LR at or below the LR of the lowest smoothed loss: past it the loss
        rises, whatever it does afterwards. The lowest loss is looked for past the curve's first
        tenth, where the EMA has averaged too few batches to be trusted.
        """
        return suggest_lr(self._usable(), method)

    def suggestions(self) -> dict[str, float | None]:
        """Every method's suggestion by name."""
        return {m: self.suggest(m) for m in SUGGESTION_METHODS}

    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` bounds for a log-uniform ``max_lr`` search.

        Rule (single-point suggestions are unreliable on noisy curves, so none decides alone):

        1. ``edge`` = the LR at the lowest smoothed loss past the curve's first tenth. Past it the
           loss rises: it is the upper limit of the useful region. ``high`` never exceeds ``edge``,
           so the range never reaches into the region where the loss climbs or diverges.
        2. ``center`` = the geometric median of the suggestions that exist and lie at or below
           ``edge`` (``steepest``, ``valley``, ``minimum``, ``slide``).
        3. ``high = min(edge, 3 * center)`` and ``low = min(center, high) / 30``: about two decades,
           skewed low, because a full fine-tuning run trains best below the LR at which a
           100-step sweep makes the fastest progress.
        4. Curves with no descent to read have no suggestions: fewer than 5 usable points, or a
           lowest smoothed loss less than 5 % below the starting level, or within 3 standard errors
           of the per-step noise of it (the raw losses tell the noise: a short sweep at a small
           batch can dip by luck), as when a head trained from scratch sees too few examples per
           step. Their ``edge`` is a third of the LR from which the loss stays more than 5 % above
           its flat level (the median smoothed loss over the curve's first half), climbing for good
           (a noise bump that comes back does not count; the last LR if it never does), and they,
           like curves without suggestions, get
           ``(edge / 100, edge)``. :attr:`warning` says so.
        5. ``low`` is never below the sweep's first LR (nothing there was measured); ``low < high``
           always holds.
        """
        curve = self._usable()
        if not curve.lrs:
            start = float(self.settings.get("start_lr", 1e-7))
            return (start, start * 10.0)
        return bounds_from_curve(curve, self.suggestions())

    def consensus(self, divide: float = 1.0) -> float:
        """One LR from the whole curve: the geometric mean of the suggestions that exist, divided
        by ``divide``, clipped into :meth:`bounds` (their geometric middle when there is none)."""
        low, high = self.bounds()
        found = [v for v in self.suggestions().values() if v]
        if not found:
            return math.sqrt(low * high)
        return min(max(math.exp(sum(math.log(v) for v in found) / len(found)) / divide, low), high)

    @property
    def warning(self) -> str | None:
        """Why the bounds should not be trusted, or ``None`` when the curve showed a descent."""
        curve = self._usable()
        if not no_descent(curve):
            return None
        return (f"the smoothed loss never fell {MIN_DROP * 100:g} % and {NOISE_Z:g} standard errors of its noise "
                f"below its starting level over {len(curve.lrs)} usable steps, so the bounds are a guess from "
                "where it climbs for good; raise range_test.num_steps or the batch size, or lower range_test.start_lr")

    def _usable(self) -> Curve:
        """The points before divergence (a diverged last point is shown, never suggested)."""
        n = len(self.lrs)
        if self.stop_reason == "diverged" and n:
            n -= 1
        return Curve(self.lrs[:n], self.losses[:n], self.raw_losses[:n], float(self.settings.get("smooth", 1.0)))

    # ---- output ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary: curve, suggestions, bounds and settings."""
        low, high = self.bounds()
        data = asdict(self)
        data["suggestions"] = self.suggestions()
        data["bounds"] = [low, high]
        data["warning"] = self.warning
        return data

    def plot(self, path: str, *, title: str | None = None) -> str:
        """Write a PNG of loss against LR (log axis) with each suggestion and the bounds marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        try:
            ax.plot(self.lrs, self.raw_losses, color="0.75", lw=1, label="loss")
            ax.plot(self.lrs, self.losses, color="C0", lw=2, label="smoothed loss")
            low, high = self.bounds()
            ax.axvspan(low, high, color="C2", alpha=0.15, label=f"bounds [{low:.2g}, {high:.2g}]")
            for i, (method, lr) in enumerate(self.suggestions().items()):
                if lr is not None:
                    ax.axvline(lr, color=f"C{i + 3}", ls="--", lw=1, label=f"{method} {lr:.2g}")
            if self.diverged_lr is not None:
                ax.axvline(self.diverged_lr, color="C1", lw=1, label=f"stopped {self.diverged_lr:.2g}")
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("loss")
            finite = [x for x in self.losses if math.isfinite(x)]
            if finite:
                lo, hi = min(finite), max(finite[: max(1, len(finite) // 10)] + [min(finite)])
                span = max(hi - lo, 1e-12)
                ax.set_ylim(lo - 0.1 * span, max(self.losses[0], hi) + 0.5 * span)
            ax.set_title(title or "LR range test")
            ax.legend(loc="best", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        return path


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_loader yielded no batches")


def _check(name: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be {allowed}")


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_args(optimizer: torch.optim.Optimizer, *, start_lr: Any, end_lr: Any, num_steps: Any,
                mode: Any, smooth: Any, diverge_factor: Any, accumulation_steps: Any) -> None:
    _check("start_lr", _num(start_lr) and start_lr > 0, start_lr, "a number > 0")
    _check("end_lr", _num(end_lr) and end_lr > start_lr, end_lr, f"a number > start_lr ({start_lr!r})")
    _check("num_steps", isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 2,
           num_steps, "an integer >= 2")
    _check("mode", mode in MODES, mode, "one of " + ", ".join(MODES))
    _check("smooth", _num(smooth) and 0 < smooth <= 1, smooth, "a number with 0 < smooth <= 1")
    _check("diverge_factor", _num(diverge_factor) and diverge_factor > 1, diverge_factor, "a number > 1")
    _check("accumulation_steps",
           isinstance(accumulation_steps, int) and not isinstance(accumulation_steps, bool)
           and accumulation_steps >= 1, accumulation_steps, "an integer >= 1")
    if any("initial_lr" in g for g in optimizer.param_groups):
        raise ValueError(
            "optimizer has a learning-rate scheduler attached (param group has 'initial_lr'); "
            "run the range test on a fresh optimizer"
        )


def _lr_at(i: int, start_lr: float, end_lr: float, num_steps: int, mode: str) -> float:
    t = i / (num_steps - 1)
    if mode == "exp":
        return start_lr * (end_lr / start_lr) ** t
    return start_lr + (end_lr - start_lr) * t


def _group_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    # each group's LR relative to the peak group's, kept through the sweep
    peak = max(float(g["lr"]) for g in optimizer.param_groups)
    return [float(g["lr"]) / peak if peak > 0 else 1.0 for g in optimizer.param_groups]


@dataclass
class _Snapshot:
    """What the test restores afterwards: model and optimizer state, train/eval mode and device."""

    model_state: dict[str, torch.Tensor]
    optim_state: dict[str, Any]
    was_training: bool
    device: torch.device

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> _Snapshot:
        # snapshot on the CPU: a second copy of a large model on the GPU could run it out of memory
        model_state = {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items()}
        return cls(model_state, copy.deepcopy(optimizer.state_dict()), model.training, device)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.zero_grad(set_to_none=True)  # the sweep's last gradients go with it
        model.load_state_dict(self.model_state)
        optimizer.load_state_dict(self.optim_state)
        model.to(self.device)
        model.train(self.was_training)


def _step_loss(stepper: Stepper, batches: Iterator, val_loader: Iterable | None) -> float:
    """One optimizer step at the current LRs, the recipe's way; its training loss, or the
    validation loss after it."""
    stepper.model.train()
    step_loss = stepper.backward([next(batches) for _ in range(stepper.recipe.accumulation_steps)])
    stepper.step()
    if val_loader is not None:
        step_loss = _evaluate(stepper.model, stepper.criterion, val_loader, stepper.device,
                              stepper.autocast)
    return step_loss


def _sweep(result: RangeTestResult, optimizer: torch.optim.Optimizer, lrs: list[float],
           ratios: list[float], measure: Callable[[], float], monitor: DivergenceMonitor,
           progress: Callable[[int, int, float, float], None] | None) -> None:
    """Step through ``lrs``, recording into ``result`` until done, diverged or non-finite."""
    for i, lr in enumerate(lrs):
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        step_loss = measure()
        if not math.isfinite(step_loss):  # the monitor would stop too; record why
            result.stop_reason, result.diverged_lr = "non_finite", lr
            return
        diverged = monitor.update(step_loss)
        result.lrs.append(lr)
        result.raw_losses.append(step_loss)
        result.losses.append(monitor.smoothed)
        if progress is not None:
            progress(i + 1, len(lrs), lr, monitor.smoothed)
        if diverged:
            result.stop_reason, result.diverged_lr = "diverged", lr
            return


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    train_loader: Iterable,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    smooth: float = 0.05,
    diverge_factor: float = 4.0,
    val_loader: Iterable | None = None,
    accumulation_steps: int = 1,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
    max_grad_norm: float | None = None,
    precision: str = "fp32",
) -> RangeTestResult:
    """Run an LR range test: raise the LR from ``start_lr`` to ``end_lr`` over ``num_steps`` steps.

    The model and optimizer are snapshotted first and restored exactly afterwards (parameters,
    buffers, optimizer state and LRs, train/eval mode), also when the test fails. The LR is set on
    the optimizer directly: no scheduler is attached.

    Args:
        model: the network; moved to ``device`` for the test and back afterwards.
        optimizer: a torch optimizer over ``model``'s parameters, with no scheduler attached. With
            several parameter groups the sweep keeps their LR ratios; the peak group gets the swept LR.
        criterion: ``criterion(outputs, targets) -> loss``.
        train_loader: yields ``(inputs, targets)`` batches; restarted if it runs out.
        start_lr: first LR (> 0).
        end_lr: last LR (> start_lr).
        num_steps: optimizer steps in the sweep (>= 2).
        mode: ``"exp"`` (geometric steps) or ``"linear"``.
        smooth: weight of the newest loss in the bias-corrected EMA, in (0, 1]; 1 disables smoothing.
        diverge_factor: stop once the smoothed loss exceeds this multiple of the best (> 1).
        val_loader: if given, each step's loss is the mean loss over this loader instead of the
            training batch's.
        accumulation_steps: batches accumulated per optimizer step (>= 1).
        device: where to run; defaults to the model's device.
        progress: called as ``progress(step, num_steps, lr, smoothed_loss)`` after each step.
        max_grad_norm: clip the gradients' global norm to this before each step (``None``: no
            clipping), as the trials of a search do (its ``train.max_grad_norm``).
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU or CUDA) or ``"fp16"`` (autocast and a
            gradient scaler, CUDA only): the recipe the trials train with.

    Returns:
        A :class:`RangeTestResult`.

    Raises:
        ValueError: an argument out of range, an optimizer with a scheduler attached, or a loader
            that yields no batches.
    """
    _check_args(optimizer, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, mode=mode,
                smooth=smooth, diverge_factor=diverge_factor, accumulation_steps=accumulation_steps)
    original_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device) if device is not None else original_device
    if max_grad_norm is not None:
        _check("max_grad_norm", _num(max_grad_norm) and max_grad_norm > 0, max_grad_norm,
               "a number > 0 or None")
    recipe = Recipe(max_grad_norm, precision, accumulation_steps)
    autocast_for(recipe.precision, device)  # an unknown precision, or fp16 off CUDA, fails here

    snapshot = _Snapshot.take(model, optimizer, original_device)
    ratios = _group_ratios(optimizer)
    lrs = [_lr_at(i, start_lr, end_lr, num_steps, mode) for i in range(num_steps)]
    settings = dict(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, mode=mode, smooth=smooth,
                    diverge_factor=diverge_factor, accumulation_steps=accumulation_steps,
                    validation=val_loader is not None, device=str(device),
                    max_grad_norm=max_grad_norm, precision=recipe.precision)
    result = RangeTestResult(lrs=[], losses=[], raw_losses=[], settings=settings)

    model.to(device)
    stepper = Stepper(recipe, model, optimizer, criterion, device)
    measure = partial(_step_loss, stepper, _cycle(train_loader), val_loader)
    monitor = DivergenceMonitor(factor=diverge_factor, smooth=smooth, reference="min")
    try:
        _sweep(result, optimizer, lrs, ratios, measure, monitor, progress)
    finally:
        snapshot.restore(model, optimizer)
    return result


@torch.no_grad()
def _evaluate(model: nn.Module, criterion: Callable, loader: Iterable, device: torch.device,
              autocast: Callable) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        with autocast():
            total += float(forward(model, criterion, batch, device))
        count += 1
    model.train()
    if count == 0:
        raise ValueError("val_loader yielded no batches")
    return total / count
