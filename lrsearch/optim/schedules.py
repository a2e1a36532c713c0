"""Learning-rate schedules for fine-tuning, behind one registry.

Every schedule is built by :func:`build_scheduler` with one signature::

    scheduler = build_scheduler(optimizer, "cosine", total_steps=1000, warmup_frac=0.1)

The optimizer's current learning rate (per parameter group) is the *peak* (``max_lr``); the
scheduler is stepped once per optimizer step. Schedules that PyTorch ships are PyTorch's own
classes (``OneCycleLR``, ``CosineAnnealingLR``, ``CosineAnnealingWarmRestarts``, ``ExponentialLR``,
``StepLR``); the others are ``LambdaLR`` over pure, module-level factor functions bound with
:func:`functools.partial`, so every scheduler pickles (Ray ships them to workers) and round-trips
through ``state_dict()``. The factor functions are in :mod:`lrsearch.optim.schedule_math`, the factories
that build each scheduler in :mod:`lrsearch.optim.schedule_factories`; this module holds the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lrsearch.optim import schedule_factories as factories

__all__ = [
    "SCHEDULES",
    "Param",
    "Schedule",
    "build_scheduler",
    "lr_curve",
    "resolve_params",
]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One schedule parameter: its default and the interval it must lie in.

    ``default`` is a number, ``None`` (derived from other parameters) or a function of
    ``total_steps``; ``default_doc`` says the same in words for listings.
    """

    name: str
    doc: str
    default: float | int | None | Callable[[int], float | int]
    default_doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    #: a categorical parameter: the names it may take (then low/high do not apply)
    choices: tuple[str, ...] | None = None

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            lo = "<" if self.low_open else "<="
            hi = "<" if self.high_open else "<="
            return f"{kind} with {_fmt(self.low)} {lo} {self.name} {hi} {_fmt(self.high)}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        return kind

    def check(self, schedule: str, value: Any) -> float | int | str:
        if self.choices is not None:
            if value not in self.choices:
                raise ValueError(
                    f"schedule {schedule!r}: {self.name}={value!r} is not allowed; "
                    f"{self.name} must be {self.allowed()}"
                )
            return value
        ok_type = isinstance(value, int | float) and not isinstance(value, bool)
        if ok_type and self.integer and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not ok_type or (self.integer and not isinstance(value, int)):
            raise ValueError(
                f"schedule {schedule!r}: {self.name}={value!r} is not allowed; "
                f"{self.name} must be {self.allowed()}"
            )
        bad = not math.isfinite(value)
        if self.low is not None:
            bad |= value <= self.low if self.low_open else value < self.low
        if self.high is not None:
            bad |= value >= self.high if self.high_open else value > self.high
        if bad:
            raise ValueError(
                f"schedule {schedule!r}: {self.name}={value!r} is out of range; "
                f"{self.name} must be {self.allowed()}"
            )
        return value


@dataclass(frozen=True)
class Schedule:
    """A registered schedule: what it does, its parameters and the factory that builds it.

    Every factory has the signature ``factory(optimizer, total_steps, params) -> LRScheduler``
    where ``params`` holds every parameter of the schedule, defaults filled in and validated.
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    factory: Callable[[Optimizer, int, dict[str, Any]], LRScheduler]
    reference: str = ""

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _quarter(total_steps: int) -> int:
    return max(1, total_steps // 4)


def _third(total_steps: int) -> int:
    # ceil, so a run decays exactly twice (at 1/3 and 2/3), never a third time on its last step
    return max(1, -(-total_steps // 3))


def _warmup(default: float) -> Param:
    return Param(
        "warmup_frac",
        "fraction of total steps spent warming up linearly from 0; warmup steps = int(warmup_frac * total_steps)",
        default,
        f"{default:g}",
        low=0.0,
        high=1.0,
        high_open=True,
    )


def _min_lr_ratio(default: float, doc: str = "final LR as a fraction of max_lr") -> Param:
    return Param("min_lr_ratio", doc, default, f"{default:g}", low=0.0, high=1.0, high_open=True)


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in (
        Schedule(
            "linear",
            "linear warmup from 0 to max_lr, then linear decay to 0 (BERT fine-tuning)",
            (_warmup(0.1),),
            factories.build_linear,
            "transformers.get_linear_schedule_with_warmup",
        ),
        Schedule(
            "cosine",
            "linear warmup from 0 to max_lr, then cosine decay to min_lr_ratio * max_lr",
            (_warmup(0.1), _min_lr_ratio(0.0)),
            factories.build_cosine,
            "transformers.get_cosine_schedule_with_warmup (min_lr_ratio=0)",
        ),
        Schedule(
            "stlr",
            "ULMFiT slanted triangular: short linear rise to max_lr, long linear decay; ends at max_lr/ratio",
            (
                Param(
                    "cut_frac",
                    "fraction of steps spent rising",
                    0.1,
                    "0.1",
                    low=0.0,
                    high=1.0,
                    low_open=True,
                    high_open=True,
                ),
                Param("ratio", "how much smaller the lowest LR is than max_lr", 32.0, "32", low=1.0),
            ),
            factories.build_stlr,
        ),
        Schedule(
            "cosine_annealing",
            "half a cosine from max_lr down to min_lr_ratio * max_lr over the run, no warmup",
            (_min_lr_ratio(0.0),),
            factories.build_cosine_annealing,
            "torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total_steps)",
        ),
        Schedule(
            "cosine_restarts",
            "SGDR: cosine decays restarted at max_lr; cycle i lasts T_0 * T_mult**i steps",
            (
                Param(
                    "T_0", "steps in the first cycle", _quarter, "total_steps // 4", low=1, integer=True
                ),
                Param("T_mult", "cycle length multiplier", 2, "2", low=1, integer=True),
                _min_lr_ratio(0.0, "LR at the bottom of each cycle as a fraction of max_lr"),
            ),
            factories.build_cosine_restarts,
            "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
        ),
        Schedule(
            "exponential",
            "multiply the LR by gamma every step; by default gamma reaches min_lr_ratio at the end",
            (
                Param(
                    "gamma",
                    "per-step decay factor (give gamma or min_lr_ratio, not both)",
                    None,
                    "min_lr_ratio ** (1 / total_steps)",
                    low=0.0,
                    high=1.0,
                    low_open=True,
                ),
                _min_lr_ratio(
                    0.01, "LR at the end as a fraction of max_lr; sets gamma when gamma is not given"
                ),
            ),
            factories.build_exponential,
            "torch.optim.lr_scheduler.ExponentialLR",
        ),
        Schedule(
            "step",
            "multiply the LR by gamma every step_size steps",
            (
                Param(
                    "step_size",
                    "steps between decays",
                    _third,
                    "ceil(total_steps / 3)",
                    low=1,
                    integer=True,
                ),
                Param("gamma", "decay factor", 0.1, "0.1", low=0.0, high=1.0, low_open=True),
            ),
            factories.build_step,
            "torch.optim.lr_scheduler.StepLR",
        ),
        Schedule(
            "one_cycle",
            "Smith's one-cycle: cosine rise from max_lr/div_factor to max_lr, then cosine decay far below",
            (
                Param(
                    "pct_start",
                    "fraction of steps spent rising",
                    0.3,
                    "0.3",
                    low=0.0,
                    high=1.0,
                    low_open=True,
                    high_open=True,
                ),
                Param("div_factor", "initial LR = max_lr / div_factor", 25.0, "25", low=1.0),
                Param(
                    "final_div_factor",
                    "final LR = initial LR / final_div_factor",
                    1e4,
                    "1e4",
                    low=1.0,
                ),
            ),
            factories.build_one_cycle,
            "torch.optim.lr_scheduler.OneCycleLR(anneal_strategy='cos')",
        ),
        Schedule(
            "schedule_free",
            "schedule-free AdamW: constant max_lr after a linear warmup, the optimizer averaging its iterates "
            "instead of a decay (the trial trains with schedulefree.AdamWScheduleFree)",
            (_warmup(0.05),),
            factories.build_constant,
            "schedulefree.AdamWScheduleFree (Defazio et al., 2024) + transformers.get_constant_schedule_with_warmup",
        ),
        Schedule(
            "wsd",
            "warmup-stable-decay: linear warmup, flat at max_lr, then a cooldown over the last decay_frac",
            (
                _warmup(0.1),
                Param(
                    "decay_frac",
                    "fraction of total steps spent cooling down at the end; decay steps = int(decay_frac * total_steps)",
                    0.2,
                    "0.2",
                    low=0.0,
                    high=1.0,
                    low_open=True,
                ),
                Param(
                    "decay_type",
                    "the cooldown's shape",
                    "1-sqrt",
                    "'1-sqrt'",
                    choices=("linear", "cosine", "1-sqrt"),
                ),
                _min_lr_ratio(0.0),
            ),
            factories.build_wsd,
            "transformers.get_wsd_schedule(warmup_type='linear', num_training_steps=total_steps)",
        ),
        Schedule(
            "constant",
            "constant max_lr after an optional linear warmup",
            (_warmup(0.0),),
            factories.build_constant,
            "transformers.get_constant_schedule_with_warmup",
        ),
    )
}


def _get(name: str) -> Schedule:
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(
            f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}"
        )
    return SCHEDULES[name]


def _check_total_steps(total_steps: Any) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} is not allowed; total_steps must be an integer >= 1")
    return total_steps


def resolve_params(name: str, total_steps: int, **params: Any) -> dict[str, Any]:
    """Validate a schedule's parameters and fill in its defaults.

    Args:
        name: a key of :data:`SCHEDULES`.
        total_steps: optimizer steps the schedule spans.
        **params: the schedule's own parameters; omitted ones take their defaults.

    Returns:
        Every parameter of the schedule with its value, ready for :func:`build_scheduler`.

    Raises:
        ValueError: unknown schedule or parameter, or a value out of range; the message names it,
            the value received and what is allowed.
    """
    schedule = _get(name)
    total_steps = _check_total_steps(total_steps)
    unknown = sorted(set(params) - set(schedule.param_names))
    if unknown:
        allowed = ", ".join(schedule.param_names) or "none"
        raise ValueError(
            f"schedule {name!r} has no parameter {unknown[0]!r}; allowed: {allowed}"
        )
    resolved: dict[str, Any] = {}
    for p in schedule.params:
        value = params.get(p.name)
        if value is None:
            value = p.default(total_steps) if callable(p.default) else p.default
        resolved[p.name] = None if value is None else p.check(name, value)
    if name == "wsd" and resolved["warmup_frac"] + resolved["decay_frac"] > 1.0 + 1e-12:
        raise ValueError(
            f"schedule 'wsd': warmup_frac={resolved['warmup_frac']!r} + decay_frac={resolved['decay_frac']!r} "
            "is over 1; warmup and cooldown must fit in the run"
        )
    if name == "exponential":
        given_gamma, given_ratio = params.get("gamma"), params.get("min_lr_ratio")
        if (given_gamma is not None and given_ratio is not None
                and not math.isclose(resolved["gamma"] ** total_steps, resolved["min_lr_ratio"],
                                     rel_tol=1e-9)):
            # both may be given only when they agree (as resolve_params itself returns them)
            raise ValueError(
                f"schedule 'exponential': gamma={given_gamma!r} and min_lr_ratio={given_ratio!r} "
                f"disagree over {total_steps} steps; give gamma or min_lr_ratio, not both"
            )
        if given_gamma is None:
            ratio = resolved["min_lr_ratio"]
            if ratio <= 0.0:
                raise ValueError(
                    f"schedule 'exponential': min_lr_ratio={ratio!r} is out of range; "
                    "min_lr_ratio must be a number with 0 < min_lr_ratio < 1 when gamma is not given"
                )
            resolved["gamma"] = ratio ** (1.0 / total_steps)
        else:
            resolved["min_lr_ratio"] = resolved["gamma"] ** total_steps
    return resolved


def build_scheduler(optimizer: Optimizer, name: str, total_steps: int, **params: Any) -> LRScheduler:
    """Build schedule ``name`` on ``optimizer``, spanning ``total_steps`` optimizer steps.

    The optimizer's current ``lr`` of each parameter group is that group's peak (``max_lr``).
    Step the returned scheduler once after every ``optimizer.step()``.

    Defaults (``lrsearch schedules`` lists them all):
        - ``linear``, ``cosine``: ``warmup_frac=0.1``; ``cosine``: ``min_lr_ratio=0``.
        - ``stlr``: ``cut_frac=0.1``, ``ratio=32``.
        - ``cosine_restarts``: ``T_0=total_steps // 4``, ``T_mult=2``.
        - ``exponential``: ``gamma`` reaching ``min_lr_ratio=0.01`` at the last step.
        - ``step``: ``step_size=ceil(total_steps / 3)``, ``gamma=0.1``.
        - ``one_cycle``: ``pct_start=0.3``, ``div_factor=25``, ``final_div_factor=1e4``.
        - ``constant``: ``warmup_frac=0``.
        - ``schedule_free``: ``warmup_frac=0.05`` (the trials' optimizer becomes AdamWScheduleFree).
        - ``wsd``: ``warmup_frac=0.1``, ``decay_frac=0.2``, ``decay_type='1-sqrt'``, ``min_lr_ratio=0``.

    Args:
        optimizer: a torch optimizer whose ``lr`` is the peak learning rate.
        name: one of :data:`SCHEDULES`.
        total_steps: number of optimizer steps in the run (>= 1).
        **params: schedule parameters (``warmup_frac``, ``min_lr_ratio``, ``cut_frac``, ``ratio``,
            ``T_0``, ``T_mult``, ``gamma``, ``step_size``, ``pct_start``, ``div_factor``,
            ``final_div_factor``, ``decay_frac``, ``decay_type``), each only for the schedules that have it.

    Returns:
        A ``torch.optim.lr_scheduler.LRScheduler``.

    Raises:
        ValueError: unknown schedule or parameter, or a value out of range.

    Example:
        >>> import torch
        >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        >>> sched = build_scheduler(opt, "linear", total_steps=100, warmup_frac=0.1)
        >>> [round(lr, 8) for lr in lr_curve("linear", 100, 3e-4, warmup_frac=0.1)[9:12]]
        [0.00027, 0.0003, 0.00029667]
    """
    resolved = resolve_params(name, total_steps, **params)
    for group in optimizer.param_groups:
        # torch keeps an existing 'initial_lr' from an earlier scheduler; the current lr is the peak.
        group.pop("initial_lr", None)
    return SCHEDULES[name].factory(optimizer, total_steps, resolved)


def lr_curve(name: str, total_steps: int, max_lr: float = 1.0, **params: Any) -> list[float]:
    """The LR at each of ``total_steps`` optimizer steps for schedule ``name`` peaking at ``max_lr``."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=max_lr)
    scheduler = build_scheduler(optimizer, name, total_steps, **params)
    lrs = []
    for _ in range(total_steps):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    return lrs
