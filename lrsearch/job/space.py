"""Search spaces: per-family YAML files, range-test bounds, and the define-by-run sampler.

A space file (``search_spaces/<family>.yaml``) lists which schedule types to search and, for each
type, only its own parameters. The space is conditional: the schedule type is the root choice and
only that type's parameters are sampled (Optuna define-by-run, through Ray Tune's ``OptunaSearch``).

Two parameters are fractions of the trial's run rather than step counts, because a space is written
before the number of optimizer steps is known: ``T_0_frac`` (``cosine_restarts``) and
``step_size_frac`` (``step``). :func:`schedule_params` turns them into ``T_0`` / ``step_size``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lrsearch.errors import ConfigError
from lrsearch.optim.schedules import SCHEDULES, resolve_params

__all__ = [
    "FAMILIES",
    "Range",
    "SearchSpace",
    "SpaceSampler",
    "load_space",
    "resolve_space",
    "schedule_params",
    "spaces_dir",
]

FAMILIES = ("default", "resnet", "efficientnet", "vit", "bert", "gpt2", "lora")

#: space-only parameters, expressed as a fraction of the run, and the schedule parameter they set
FRACTION_PARAMS = {"cosine_restarts": {"T_0_frac": "T_0"}, "step": {"step_size_frac": "step_size"}}


def spaces_dir() -> Path:
    """The directory holding the shipped space files (the repository's, or the installed copy)."""
    here = Path(__file__).resolve().parents[2] / "search_spaces"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "lrsearch" / "search_spaces"


class Range(BaseModel):
    """A numeric range: ``low <= x <= high``, sampled log-uniformly when ``log``."""

    model_config = ConfigDict(extra="forbid")

    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be less than high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must be above 0 (got low={self.low:g})")
        return self


#: a parameter's search: a range, a list of choices, or one fixed value
ParamSpec = Range | list[float] | list[str] | float | str  # str: a categorical parameter (wsd.decay_type)


class SearchSpace(BaseModel):
    """One space file, validated."""

    model_config = ConfigDict(extra="forbid")

    family: str
    description: str = ""
    max_lr_prior: Range
    default_schedule: str
    schedules: dict[str, dict[str, ParamSpec]]
    weight_decay: Range | None = None
    layer_decay: Range | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if not self.schedules:
            raise ValueError("schedules: must name at least one schedule")
        for name, params in self.schedules.items():
            if name not in SCHEDULES:
                raise ValueError(f"schedules.{name}: unknown schedule; allowed: {', '.join(SCHEDULES)}")
            allowed = _space_params(name)
            for pname, spec in params.items():
                if pname not in allowed:
                    raise ValueError(
                        f"schedules.{name}.{pname}: unknown parameter of {name!r}; "
                        f"allowed: {', '.join(allowed) or 'none'}"
                    )
                if isinstance(spec, list) and not spec:
                    raise ValueError(f"schedules.{name}.{pname}: empty list of choices")
                _check_domain(name, pname, spec)
        if self.default_schedule not in self.schedules:
            raise ValueError(
                f"default_schedule: {self.default_schedule!r} is not one of the space's schedules "
                f"({', '.join(self.schedules)})"
            )
        if self.layer_decay is not None and not (0 < self.layer_decay.low and self.layer_decay.high <= 1):
            raise ValueError("layer_decay: must lie in (0, 1]")
        if self.weight_decay is not None and self.weight_decay.low < 0:
            raise ValueError("weight_decay: must be >= 0")
        return self

    def with_max_lr(self, low: float, high: float) -> SearchSpace:
        return self.model_copy(update={"max_lr_prior": Range(low=low, high=high, log=True)})


def _space_params(schedule: str) -> list[str]:
    fractions = FRACTION_PARAMS.get(schedule, {})
    own = [p for p in SCHEDULES[schedule].param_names if p not in fractions.values()]
    if schedule == "exponential":
        own = [p for p in own if p != "gamma"]  # gamma depends on the run's length; min_lr_ratio does not
    return own + list(fractions)


def _check_domain(schedule: str, pname: str, spec: ParamSpec) -> None:
    """Every value the spec can produce must be valid for the schedule."""
    values = [spec.low, spec.high] if isinstance(spec, Range) else spec if isinstance(spec, list) else [spec]
    for value in values:
        if pname in FRACTION_PARAMS.get(schedule, {}):
            if not 0 < value <= 1:
                raise ValueError(f"schedules.{schedule}.{pname}: {value!r} must be a fraction in (0, 1]")
            continue
        param = next(p for p in SCHEDULES[schedule].params if p.name == pname)
        if param.choices is not None and isinstance(spec, Range):
            raise ValueError(f"schedules.{schedule}.{pname}: takes a list of choices "
                             f"({', '.join(param.choices)}), not a range")
        if param.integer and isinstance(spec, Range):
            raise ValueError(f"schedules.{schedule}.{pname}: an integer parameter takes a list of choices")
        try:
            param.check(schedule, value)
        except ValueError as exc:
            raise ValueError(f"schedules.{schedule}.{pname}: {exc}") from None


def load_space(family_or_path: str) -> SearchSpace:
    """Load a shipped family (``bert``) or a space file path.

    Raises:
        ConfigError: unknown family, missing file, YAML error, or an invalid space (empty choice,
            ``low >= high``, log range through 0, unknown schedule or parameter).
    """
    path = Path(family_or_path)
    if family_or_path in FAMILIES:
        path = spaces_dir() / f"{family_or_path}.yaml"
    elif not path.suffix:
        raise ConfigError(
            f"space.family: got {family_or_path!r}; allowed: {', '.join(FAMILIES)} (or space.file: a YAML path)"
        )
    if not path.is_file():
        raise ConfigError(f"space.file: got {str(path)!r}; no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {str(exc).splitlines()[0]}") from None
    return _validate(data, str(path))


def _validate(data: Any, source: str) -> SearchSpace:
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("Range", "list[", "float")))
        msg = first["msg"].removeprefix("Value error, ")
        prefix = f"{where}: " if where and not msg.startswith(where) else ""
        raise ConfigError(f"{source}: {prefix}{msg} (got {first['input']!r})") from None


def resolve_space(
    base: SearchSpace,
    *,
    bounds: tuple[float, float] | None = None,
    schedules: list[str] | None = None,
    max_lr: Range | None = None,
    widen: float = 1.0,
    weight_decay: Range | None = None,
    layer_decay: Range | None = None,
) -> SearchSpace:
    """The space a search runs: the file's space, narrowed and with ``max_lr`` decided.

    ``max_lr`` is, in order of precedence: the job's explicit ``max_lr`` range; the range test's
    ``bounds`` widened by ``widen`` on each side (log-uniform); the family's prior.
    """
    space = base
    if schedules:
        unknown = [s for s in schedules if s not in base.schedules]
        if unknown:
            raise ConfigError(
                f"space.schedules: got {unknown[0]!r}; the {base.family!r} space has: {', '.join(base.schedules)}"
            )
        default = base.default_schedule if base.default_schedule in schedules else schedules[0]
        space = space.model_copy(update={
            "schedules": {s: base.schedules[s] for s in schedules}, "default_schedule": default})
    if max_lr is not None:
        space = space.with_max_lr(max_lr.low, max_lr.high)
    elif bounds is not None:
        low, high = bounds
        space = space.with_max_lr(low / widen, high * widen)
    updates = {}
    if weight_decay is not None:
        updates["weight_decay"] = weight_decay
    if layer_decay is not None:
        updates["layer_decay"] = layer_decay
    if updates:
        space = space.model_copy(update=updates)
    return _validate(space.model_dump(), "space")


#: parameters that set how long a schedule climbs to its peak, as a fraction of the run
WARMUP_PARAMS = ("warmup_frac", "pct_start", "cut_frac")


def end_warmup_by(space: SearchSpace, fraction: float) -> SearchSpace:
    """The space with every warmup-like range ending by ``fraction`` of the run.

    ASHA judges every trial at its first rung; a trial still climbing to its peak LR there is
    judged before its schedule has shown anything (a one-cycle trial at ``pct_start`` 0.5 of a
    3-epoch run peaks at epoch 1.5, after a rung at epoch 1). Capping the climb at the first rung's
    share of the run keeps every trial past its warmup when it is first judged.
    """
    changed = {}
    for name, params in space.schedules.items():
        new = dict(params)
        for pname in WARMUP_PARAMS:
            spec = params.get(pname)
            if isinstance(spec, Range) and spec.high > fraction:
                new[pname] = Range(low=min(spec.low, fraction / 2), high=fraction, log=spec.log)
            elif isinstance(spec, list) and max(spec) > fraction:
                new[pname] = [v for v in spec if v <= fraction] or [fraction]
            elif isinstance(spec, int | float) and spec > fraction:
                new[pname] = fraction
        changed[name] = new
    return space.model_copy(update={"schedules": changed})


class SpaceSampler:
    """Optuna define-by-run function for a :class:`SearchSpace` (picklable: Ray checkpoints it).

    Parameter names are ``max_lr``, ``schedule``, ``<schedule>/<param>``, ``weight_decay`` and
    ``layer_decay``; Ray Tune unflattens ``/`` so a trial's config reads
    ``{"max_lr": ..., "schedule": "cosine", "cosine": {"warmup_frac": ...}}``.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        s = self.space
        r = s.max_lr_prior
        trial.suggest_float("max_lr", r.low, r.high, log=True)
        schedule = trial.suggest_categorical("schedule", list(s.schedules))
        for pname, spec in s.schedules[schedule].items():
            key = f"{schedule}/{pname}"
            if isinstance(spec, Range):
                trial.suggest_float(key, spec.low, spec.high, log=spec.log)
            elif isinstance(spec, list):
                trial.suggest_categorical(key, spec)
            else:
                trial.suggest_categorical(key, [spec])
        if s.weight_decay is not None:
            wd = s.weight_decay
            trial.suggest_float("weight_decay", wd.low, wd.high, log=wd.log)
        if s.layer_decay is not None:
            ld = s.layer_decay
            trial.suggest_float("layer_decay", ld.low, ld.high, log=ld.log)
        return None

    def first_point(self, max_lr: float, schedule: str | None = None) -> dict[str, Any]:
        """A trial config for ``max_lr`` with ``schedule`` (default: the space's default) at the middle
        of its ranges."""
        s = self.space
        schedule = schedule or s.default_schedule
        point: dict[str, Any] = {"max_lr": max_lr, "schedule": schedule}
        for pname, spec in s.schedules[schedule].items():
            if isinstance(spec, Range):
                mid = math.sqrt(spec.low * spec.high) if spec.log else (spec.low + spec.high) / 2
            elif isinstance(spec, list):
                mid = spec[len(spec) // 2]
            else:
                mid = spec
            point[f"{schedule}/{pname}"] = mid
        if s.weight_decay is not None:
            wd = s.weight_decay
            point["weight_decay"] = math.sqrt(wd.low * wd.high) if wd.log else (wd.low + wd.high) / 2
        if s.layer_decay is not None:
            point["layer_decay"] = s.layer_decay.high
        return point


def schedule_params(config: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """The schedule parameters of a trial config, in :func:`~lrsearch.optim.schedules.build_scheduler` form.

    Fractions of the run become step counts; every parameter is validated and defaults filled in.
    """
    name = config["schedule"]
    params = dict(config.get(name) or {})
    for frac_name, step_name in FRACTION_PARAMS.get(name, {}).items():
        if frac_name in params:
            params[step_name] = max(1, round(params.pop(frac_name) * total_steps))
    for key in ("T_mult", "step_size", "T_0"):
        if key in params and isinstance(params[key], float) and params[key].is_integer():
            params[key] = int(params[key])
    return resolve_params(name, total_steps, **params)
