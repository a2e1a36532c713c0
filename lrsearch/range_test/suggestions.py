"""Suggestions and search bounds read off a range-test curve: pure functions of its points.

:class:`~lrsearch.range_test.RangeTestResult` exposes them as ``suggest``, ``suggestions`` and
``bounds``, whose docstrings describe each method and the bounds rule; the functions here take the
usable points (before divergence) of the curve, LRs increasing: the smoothed losses, and for the
descent and climb tests also the raw ones and the EMA's weight, which tell its noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_DROP", "NOISE_Z", "SUGGESTION_METHODS", "Curve", "bounds_from_curve", "no_descent", "suggest_lr"]

SUGGESTION_METHODS = ("steepest", "valley", "minimum", "slide")


#: a descent counts when the smoothed loss falls below the starting plateau by this share of it;
#: less is within the noise of a flat curve
MIN_DROP = 0.05

#: ... and by this many standard errors of the per-step noise: a few batches of 4 images can vary
#: by 10 % of the loss, so a short sweep's minimum can be luck, not a descent
NOISE_Z = 3.0


@dataclass(frozen=True)
class Curve:
    """The usable points of a range test: LRs increasing, the smoothed losses, the raw losses and
    the EMA's weight (``smooth``, 1: no smoothing)."""

    lrs: list[float]
    losses: list[float]
    raw: list[float]
    smooth: float = 1.0

    def head(self) -> int:
        """How many points the starting level is read from: the first tenth, at least 3."""
        return min(len(self.losses), max(3, len(self.losses) // 10))

    def noise(self) -> float:
        """The standard deviation of one step's loss, read robustly from consecutive differences
        (their median absolute value is 0.954 sigma for Gaussian noise; a slow trend hardly moves it)."""
        if len(self.raw) < 2:
            return 0.0
        return float(np.median(np.abs(np.diff(self.raw)))) / 0.954


def bottom_index(losses: list[float]) -> int:
    """Index of the lowest smoothed loss, ignoring the curve's first tenth.

    There the bias-corrected EMA averages only a few batches, so one lucky batch can set a
    minimum the rest of the sweep never beats.
    """
    skip = len(losses) // 10
    return skip + int(np.argmin(losses[skip:]))


def _plateau(losses: list[float]) -> float:
    """The starting level: the median smoothed loss over the curve's first tenth."""
    return float(np.median(losses[: max(1, len(losses) // 10)]))


def no_descent(curve: Curve) -> bool:
    """True when the curve shows no descent to read: too short, or its lowest smoothed loss past the
    first tenth is less than :data:`MIN_DROP` of the starting level below it, or the raw losses
    there are not below the first ones by :data:`NOISE_Z` standard errors of the per-step noise
    (a flat curve's minimum is luck).
    """
    losses = curve.losses
    if len(losses) < 5:
        return True
    plateau = _plateau(losses)
    bottom = bottom_index(losses)
    if bottom == len(losses) // 10 or plateau - losses[bottom] < MIN_DROP * abs(plateau):
        return True
    # the raw losses each level averages: the first ones, and those of the EMA's span ending at the
    # minimum (fewer when the minimum comes early; the two may overlap)
    span = max(1, round(1.0 / curve.smooth))
    first = np.asarray(curve.raw[: curve.head()])
    near = np.asarray(curve.raw[max(0, bottom - span + 1): bottom + 1])
    se = curve.noise() * float(np.sqrt(1.0 / len(first) + 1.0 / len(near)))
    return float(first.mean() - near.mean()) < NOISE_Z * se


def suggest_lr(curve: Curve, method: str) -> float | None:
    """Suggestion ``method`` for the curve; ``None`` when it is too short or shows no descent.

    Raises:
        ValueError: ``method`` is not one of :data:`SUGGESTION_METHODS`.
    """
    if method not in SUGGESTION_METHODS:
        raise ValueError(
            f"unknown suggestion method {method!r}; allowed: {', '.join(SUGGESTION_METHODS)}"
        )
    if no_descent(curve):
        return None
    return _SUGGESTERS[method](curve.lrs, curve.losses)


def bounds_from_curve(curve: Curve, suggestions: Mapping[str, float | None]) -> tuple[float, float]:
    """``(low, high)`` for a log-uniform ``max_lr`` search from a non-empty curve and its suggestions.

    The rule is :meth:`lrsearch.range_test.RangeTestResult.bounds`'s.
    """
    lrs, losses = curve.lrs, curve.losses
    if no_descent(curve):
        # nothing to read but where the loss starts to climb: a third of that is taken as the edge
        edge = max(_rise_lr(curve) / 3.0, lrs[0])
        found = []
    else:
        edge = lrs[bottom_index(losses)]
        found = [s for s in suggestions.values() if s is not None and 0 < s <= edge]
    if not found:
        low, high = edge / 100.0, edge
    else:
        center = float(np.exp(np.median(np.log(found))))
        high = min(edge, center * 3.0)
        low = min(center, high) / 30.0
    # never below the sweep: nothing there was measured, and a noisy start must not drag the search
    # into LRs too small to train at all
    low = max(low, lrs[0])
    if not low < high:
        high = max(high, low * 10.0)
    return (float(low), float(high))


def _rise_lr(curve: Curve) -> float:
    """The LR past the curve's first tenth from which the smoothed loss stays more than
    :data:`MIN_DROP` above its flat level to the end: where it climbs for good (a flat, noisy
    curve crosses that line and comes back long before it diverges); the last LR when it ends
    below it. The flat level is the median smoothed loss over the curve's first half: on a curve
    without a descent, its first tenth can be two lucky batches, below the level the rest of the
    flat stretch keeps (a 27-step sweep at a batch of 4 climbed "for good" from 3e-5 that way)."""
    lrs, losses = curve.lrs, curve.losses
    level = float(np.median(losses[: max(1, len(losses) // 2)]))
    limit = level + MIN_DROP * abs(level)
    first = len(losses)
    while first > len(losses) // 10 and losses[first - 1] > limit:
        first -= 1
    return lrs[min(first, len(lrs) - 1)]


def _suggest_steepest(lrs: list[float], losses: list[float]) -> float | None:
    # Only the descent counts: the points up to and including the lowest smoothed loss. A loss that
    # spikes past the minimum and falls back can fall faster than the descent did, at an LR that
    # is already too high. The gradient is taken on that stretch alone, so that no point after the
    # minimum enters it (np.gradient's central difference would look one point ahead).
    n = len(lrs)
    bottom = bottom_index(losses)
    start, end = int(0.1 * n), min(bottom + 1, n - max(1, int(0.05 * n)))
    if end - start < 3:
        start, end = 0, bottom + 1
    if end - start < 2:
        return None  # the loss never fell
    x = np.log10(np.asarray(lrs[start:end]))
    y = np.asarray(losses[start:end])
    grad = np.gradient(y, x)
    i = int(np.argmin(grad))
    if grad[i] >= 0:
        return None
    return float(lrs[start + i])


def _suggest_minimum(lrs: list[float], losses: list[float]) -> float | None:
    return float(lrs[bottom_index(losses)] / 10.0)


def _suggest_valley(lrs: list[float], losses: list[float]) -> float | None:
    # The descent runs from the last point still near the starting plateau (less than 10 % of the
    # total drop below it) to the minimum; the valley suggestion is its middle on the log axis.
    y = np.asarray(losses)
    bottom = bottom_index(losses)
    plateau = _plateau(losses)
    drop = plateau - float(y[bottom])
    if bottom < 2 or drop <= 0:
        return None
    top = 0
    for i in range(bottom):
        if y[i] > plateau - 0.1 * drop:
            top = i
    if bottom - top < 2:
        return None
    return float(np.sqrt(lrs[top] * lrs[bottom]))


def _suggest_slide(lrs: list[float], losses: list[float]) -> float | None:
    x = np.log10(np.asarray(lrs))
    y = np.asarray(losses)
    span = float(np.ptp(y))
    if span <= 0:
        return None
    slope = np.gradient(y / span, x)  # loss range per decade
    window = max(2, len(lrs) // 7)
    right = bottom_index(losses)  # start left of where the loss rises
    while right - window >= 0:
        left = right - window
        if abs(slope[right] - slope[left]) < 0.05:
            return float(lrs[left])
        right -= 1
    return None


_SUGGESTERS: dict[str, Callable[[list[float], list[float]], float | None]] = {
    "steepest": _suggest_steepest,
    "valley": _suggest_valley,
    "minimum": _suggest_minimum,
    "slide": _suggest_slide,
}
