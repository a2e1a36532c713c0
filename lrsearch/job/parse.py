"""Reading a job: a YAML file (``yaml.safe_load``), a dict or a :class:`~lrsearch.job.config.JobConfig`
validated once. Unknown keys are rejected and every bad value becomes one line naming the field
path, the value received and what is allowed (a :class:`~lrsearch.errors.ConfigError`)."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lrsearch.errors import ConfigError
from lrsearch.job.config import JobConfig
from lrsearch.job.space import SearchSpace
from lrsearch.job.task_config import TASK_MODELS

__all__ = ["JobLike", "load_job", "parse_job", "read_job_file"]

JobLike = JobConfig | str | Path | dict[str, Any]


def _field_path(loc: tuple[Any, ...]) -> str:
    # pydantic puts the union member's tag in the location ('task', 'text_classification', 'x'):
    # users wrote 'task.x'.
    parts = [str(p) for p in loc if p not in _TAGS and not _UNION_MEMBER.match(str(p))]
    return ".".join(parts) or "(top level)"


#: the member names pydantic puts in the location of a ``number | "auto"`` field's errors
_UNION_MEMBER = re.compile(r"^(constrained-)?(int|float)$|^literal\[")


def _error_lines(errors: list[dict[str, Any]], data: Any) -> list[str]:
    """One line per bad field: a ``number | 'auto'`` field's two member errors become one."""
    lines: dict[str, str] = {}
    for e in errors:
        path = _field_path(e["loc"])
        if e["type"] == "literal_error" and path in lines:
            lines[path] += f", or {e['ctx']['expected']}"
        elif e["type"] != "literal_error" or path not in lines:
            lines.setdefault(path, _describe(e, data))
    return list(lines.values())




def _describe(error: dict[str, Any], data: Any) -> str:
    path = _field_path(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1], data)
        return f"{path}: unknown field (got {error['input']!r}); allowed fields: {allowed}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "union_tag_invalid":
        return (f"{path}.kind: got {error['input'].get('kind')!r}; allowed: "
                f"{error['ctx']['expected_tags']}")
    if kind == "union_tag_not_found":
        return f"{path}.kind: required field is missing; allowed: {', '.join(sorted(_TAGS))}"
    ctx = error.get("ctx") or {}
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{path}: got {error['input']!r}; allowed: a value {bounds[kind]} {limit}"
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{path}: got {error['input']!r}; allowed: an integer"
    if kind in ("float_parsing", "float_type"):
        return f"{path}: got {error['input']!r}; allowed: a number"
    if kind == "finite_number":
        return f"{path}: got {error['input']!r}; allowed: a finite number"
    if kind == "enum":
        return f"{path}: got {error['input']!r}; allowed: {ctx.get('expected')}"
    msg = error["msg"]
    msg = msg.removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    return f"{path}: got {error['input']!r}; {msg}"


def _allowed_keys(loc: tuple[Any, ...], data: Any) -> str:
    model: Any = JobConfig
    for part in loc:
        if isinstance(part, str) and part in _TAGS:
            model = _TASK_MODELS[part]
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return "?"
        # ``X | None`` (an optional section, e.g. task.peft): the section's model is X
        models = [a for a in (typing.get_args(field.annotation) or (field.annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        model = models[0] if len(models) == 1 else None
        if model is None and part == "task":
            continue
        if model is None:
            return "?"
    if model is None or not hasattr(model, "model_fields"):
        return "?"
    return ", ".join(k for k in model.model_fields if k != "base_dir")


_TASK_MODELS = TASK_MODELS
_TAGS = set(_TASK_MODELS)


def parse_job(data: Any, *, source: str = "job", base_dir: str = ".") -> JobConfig:
    """Validate a job already read into Python objects (a dict from YAML or JSON).

    Raises:
        ConfigError: one line per bad value: ``source: field.path: got VALUE; what is allowed``.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping with 'name' and 'task', got {type(data).__name__}"
        )
    if "base_dir" in data:
        raise ConfigError(f"{source}: base_dir: unknown field (got {data['base_dir']!r})")
    try:
        job = JobConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        lines = [f"{source}: {line}" for line in _error_lines(exc.errors(), data)]
        raise ConfigError("\n".join(lines)) from None
    _check_budget(job, source)
    if job.train.precision == "fp16" and job.resources.gpu == 0:
        raise ConfigError(f"{source}: train.precision: got 'fp16'; fp16 needs a CUDA GPU per trial "
                          "(resources.gpu > 0); on the CPU use bf16 or fp32")
    try:
        space = job.search_space()  # a bad space fails here, before anything starts
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check_start_points(job, space, source)
    return job


def _check_budget(job: JobConfig, source: str) -> None:
    """``search.budget`` against the rest of the job: one budget, one a trial can fit in."""
    s, where = job.search, f"{source}: search.budget"
    limit = s.budget.limit()
    if limit and s.time_budget_s:
        raise ConfigError(f"{source}: search.time_budget_s: got {s.time_budget_s:g} beside search.budget "
                          f"{dict([limit])}; allowed: one of them (time_budget_s is budget.wall_s)")
    if limit and limit[0] == "gpu_hours" and job.resources.gpu == 0:
        raise ConfigError(f"{where}.gpu_hours: got {limit[1]:g}; GPU-hours count resources.gpu x seconds and "
                          "resources.gpu is 0; allowed: set resources.gpu, or budget trial_epochs or wall_s")
    first = s.grace_period if s.early_stopping == "asha" else s.max_epochs
    if limit and limit[0] == "trial_epochs" and limit[1] < first:
        raise ConfigError(f"{where}.trial_epochs: got {limit[1]}; allowed: at least {first}, the epochs of a "
                          f"trial's first rung (search.{'grace_period' if s.early_stopping == 'asha' else 'max_epochs'})")


def _check_start_points(job: JobConfig, space: SearchSpace, source: str) -> None:
    """Each ``search.start_points`` entry names a schedule of the space and only its parameters."""
    for i, point in enumerate(job.search.start_points):
        where = f"{source}: search.start_points[{i}]"
        name = point["schedule"]
        if name not in space.schedules:
            raise ConfigError(f"{where}.schedule: got {name!r}; the {space.family!r} space has: "
                              f"{', '.join(space.schedules)}")
        allowed = {"max_lr", "schedule", "weight_decay", "layer_decay", *space.schedules[name]}
        for key, value in point.items():
            if key not in allowed:
                raise ConfigError(f"{where}.{key}: unknown for schedule {name!r}; allowed: {', '.join(sorted(allowed))}")
            if key != "schedule" and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise ConfigError(f"{where}.{key}: got {value!r}; allowed: a number")


def read_job_file(path: str | Path) -> JobConfig:
    """Read and validate a YAML job file (``yaml.safe_load``: no arbitrary objects).

    Raises:
        ConfigError: the file is missing or unreadable, is not valid YAML, or holds a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {str(path)!r} not found" if not path.exists()
                          else f"job file {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"job file {str(path)!r} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a job needs at least 'name' and 'task'")
    return parse_job(data, source=str(path), base_dir=str(path.parent.resolve()))


def load_job(job: JobLike) -> JobConfig:
    """A validated job from a :class:`JobConfig`, a YAML file's path, or a dict.

    Raises:
        ConfigError: one line per bad value, naming the field, the value and what is allowed.
    """
    if isinstance(job, JobConfig):
        return job
    if isinstance(job, str | Path):
        return read_job_file(job)
    if isinstance(job, dict):
        return parse_job(job, source="job", base_dir=str(Path.cwd()))
    raise ConfigError(f"job: got {type(job).__name__}; allowed: a JobConfig, a YAML file's path or a dict")
