"""Divergence detection on a stream of losses, shared by the LR range test and by trials.

A :class:`DivergenceMonitor` keeps a bias-corrected exponential moving average of the loss and
says when training has diverged: the loss is NaN or inf, or the smoothed loss rose above
``factor`` times a reference loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REFERENCES", "DivergenceMonitor"]

REFERENCES = ("min", "first")


@dataclass
class DivergenceMonitor:
    """Smooths a loss stream and flags divergence.

    After each finite loss the monitor updates the bias-corrected EMA
    ``avg = (1 - smooth) * avg + smooth * loss; smoothed = avg / (1 - (1 - smooth) ** n)``
    (``n`` finite losses seen so far; the first smoothed value is the loss itself, with no pull
    toward 0), then compares it with the reference loss.

    Attributes:
        factor: diverged when the smoothed loss exceeds ``factor`` x the reference loss (> 1).
        smooth: EMA weight of the newest loss, in (0, 1]; 1 disables smoothing.
        reference: what the smoothed loss is compared with, always a value of the smoothed loss:

            - ``"min"``: the lowest smoothed loss so far, the current one included. For the range
              test, whose loss first falls and then blows up: it stops where the loss climbs
              ``factor`` x above the best it reached.
            - ``"first"``: the first smoothed loss, which bias correction makes equal to the first
              loss. For trials, whose loss falls a long way during training: a rise from a low
              point is normal noise there; only a climb above the starting loss is divergence.

    Example::

        monitor = DivergenceMonitor(factor=4.0, smooth=0.05)
        for loss in losses:
            if monitor.update(loss):
                break  # stop: NaN/inf, or monitor.smoothed > 4 x monitor.reference_loss
    """

    factor: float = 4.0
    smooth: float = 0.05
    reference: str = "min"
    _avg: float = field(default=0.0, init=False, repr=False)
    _count: int = field(default=0, init=False, repr=False)
    _reference_loss: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check("factor", _finite(self.factor) and self.factor > 1, self.factor, "a finite number > 1")
        _check("smooth", _finite(self.smooth) and 0 < self.smooth <= 1, self.smooth,
               "a number with 0 < smooth <= 1")
        _check("reference", self.reference in REFERENCES, self.reference,
               "one of " + ", ".join(repr(r) for r in REFERENCES))

    def update(self, loss: float) -> bool:
        """Record one loss; return ``True`` when training has diverged.

        A NaN or inf loss is divergence and is not recorded (the smoothed loss and the reference
        keep their previous values). Otherwise the loss enters the EMA and the result says whether
        the new smoothed loss exceeds ``factor`` x the reference loss.
        """
        loss = float(loss)
        if not math.isfinite(loss):
            return True
        self._count += 1
        self._avg = (1 - self.smooth) * self._avg + self.smooth * loss
        smoothed = self.smoothed
        if self._reference_loss is None:
            # "first": the first smoothed value is the loss itself; take it exactly
            self._reference_loss = loss if self.reference == "first" else smoothed
        elif self.reference == "min":
            self._reference_loss = min(self._reference_loss, smoothed)
        return smoothed > self.factor * self._reference_loss

    @property
    def smoothed(self) -> float:
        """The bias-corrected EMA of the finite losses so far; NaN before the first one."""
        if self._count == 0:
            return math.nan
        return self._avg / (1 - (1 - self.smooth) ** self._count)

    @property
    def reference_loss(self) -> float | None:
        """The loss the smoothed loss is compared with (see ``reference``); ``None`` before the
        first finite loss."""
        return self._reference_loss

    @property
    def num_losses(self) -> int:
        """How many finite losses have been recorded."""
        return self._count

    def state_dict(self) -> dict[str, Any]:
        """The running state (plain floats and ints: fits ``torch.save`` and JSON).

        The settings (``factor``, ``smooth``, ``reference``) are not part of it: they come from
        the constructor of the monitor that loads the state.
        """
        return {"avg": self._avg, "count": self._count, "reference_loss": self._reference_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; later updates continue exactly as before."""
        missing = sorted({"avg", "count", "reference_loss"} - set(state))
        if missing:
            raise ValueError(f"DivergenceMonitor state is missing {', '.join(missing)}; got keys "
                             f"{sorted(state)}")
        reference_loss = state["reference_loss"]
        self._avg = float(state["avg"])
        self._count = int(state["count"])
        self._reference_loss = None if reference_loss is None else float(reference_loss)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check(name: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"DivergenceMonitor: {name}={value!r} is not allowed; {name} must be {allowed}")
