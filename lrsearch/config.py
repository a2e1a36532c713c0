"""The job file: one YAML file describes a search; parsed once into typed objects.

:func:`load_job` is the only place YAML is read. Every other module receives a :class:`JobConfig`.
Unknown keys are rejected and every bad value becomes one line naming the field path, the value
received and what is allowed (a :class:`~lrsearch.errors.ConfigError`).
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lrsearch.errors import ConfigError
from lrsearch.space import FAMILIES, Range, SearchSpace, load_space, resolve_space

__all__ = [
    "JobConfig",
    "OptimizerConfig",
    "RangeTestConfig",
    "TaskConfig",
    "load_job",
    "parse_job",
]

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, and values are re-checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------
# task
# --------------------------------------------------------------------------------------------


class SyntheticTask(Strict):
    """A tiny synthetic task for tests (Gaussian clusters, an MLP trained from scratch)."""

    kind: Literal["synthetic"]
    num_train: PositiveInt = 2048
    num_val: PositiveInt = 512
    num_features: PositiveInt = 32
    num_classes: Annotated[int, Field(ge=2)] = 8
    hidden: PositiveInt = 64
    noise: NonNegFloat = 2.0
    batch_size: PositiveInt = 64
    seed: int = 0


class TextClassificationTask(Strict):
    """A Hugging Face sequence classifier fine-tuned on labelled text."""

    kind: Literal["text_classification"]
    model: str = "minilm-l6"
    dataset: str = "fortunes"
    categories: list[str] | None = None
    text_column: str = "text"
    label_column: str = "label"
    num_train: Annotated[int, Field(ge=2)] = 512
    num_val: Annotated[int, Field(ge=2)] = 256
    max_length: Annotated[int, Field(ge=2)] = 64
    batch_size: PositiveInt = 16
    seed: int = 0

    @field_validator("categories")
    @classmethod
    def _categories(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) < 2:
            raise ValueError("needs at least 2 distinct categories")
        return value


class ImageClassificationTask(Strict):
    """A pretrained image classifier fine-tuned on labelled images."""

    kind: Literal["image_classification"]
    model: str = "efficientnet-lite0"
    dataset: str = "fashion_mnist"
    weights: str | None = None
    num_classes: Annotated[int, Field(ge=2)] | None = None
    image_size: Annotated[int, Field(ge=8, le=1024)] = 64
    num_train: PositiveInt = 512
    num_val: PositiveInt = 256
    batch_size: PositiveInt = 32
    seed: int = 0


_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class PythonTask(Strict):
    """The user's own task: ``entrypoint`` is ``package.module:function`` returning a ``Task``.

    The function is called with ``options`` as keyword arguments. ``path`` (relative to the job
    file) is put on ``sys.path`` first, so a task module can sit next to the job file.
    """

    kind: Literal["python"]
    entrypoint: str
    options: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        if not _ENTRYPOINT.match(value):
            raise ValueError("must look like 'package.module:function'")
        return value


TaskConfig = Annotated[
    SyntheticTask | TextClassificationTask | ImageClassificationTask | PythonTask,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------------------
# optimizer, range test
# --------------------------------------------------------------------------------------------


class OptimizerName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


class OptimizerConfig(Strict):
    """The optimizer every trial and the range test use; its LR comes from the schedule."""

    name: OptimizerName = OptimizerName.adamw
    weight_decay: NonNegFloat = 0.01
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8


class SweepMode(str, Enum):
    exp = "exp"
    linear = "linear"


class RangeTestConfig(Strict):
    """Settings of the LR range test (``lrsearch find-lr`` and the start of a search)."""

    enabled: bool = True
    start_lr: PositiveFloat = 1e-7
    end_lr: PositiveFloat = 10.0
    num_steps: Annotated[int, Field(ge=2)] = 100
    mode: SweepMode = SweepMode.exp
    smooth: Annotated[float, Field(gt=0, le=1)] = 0.05
    diverge_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 4.0
    accumulation_steps: PositiveInt = 1
    use_validation: bool = False

    @field_validator("end_lr")
    @classmethod
    def _order(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("start_lr")
        if start is not None and value <= start:
            raise ValueError(f"must be greater than start_lr ({start:g})")
        return value


class SpaceConfig(Strict):
    """Which search space to run (``search_spaces/<family>.yaml`` or a file) and job overrides."""

    family: str = "default"
    file: str | None = None
    schedules: list[str] | None = None
    max_lr: Range | None = None
    widen: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 1.0
    weight_decay: Range | None = None
    layer_decay: Range | None = None

    @field_validator("family")
    @classmethod
    def _family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"allowed: {', '.join(FAMILIES)} (or set space.file to a space YAML)")
        return value

    @field_validator("schedules")
    @classmethod
    def _schedules(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must name at least one schedule (or leave it out for all of the space's)")
        return value


class SearchConfig(Strict):
    """Ray Tune + Optuna TPE + ASHA settings."""

    num_trials: PositiveInt = 12
    max_epochs: PositiveInt = 3
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[float, Field(ge=2, allow_inf_nan=False)] = 2
    max_concurrent_trials: PositiveInt = 2
    time_budget_s: PositiveFloat | None = None
    seed: int = 0
    explode_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 4.0
    max_steps_per_epoch: PositiveInt | None = None
    max_failures: Annotated[int, Field(ge=0)] = 2
    #: trial checkpoints (model + optimizer, per epoch) are needed to resume; once the search has
    #: finished keep the best trial's ("best"), every trial's ("all") or none ("none")
    keep_checkpoints: Literal["best", "all", "none"] = "best"

    @model_validator(mode="after")
    def _grace_le_max(self) -> SearchConfig:
        if self.grace_period > self.max_epochs:
            raise ValueError(
                f"grace_period ({self.grace_period}) must be at most max_epochs ({self.max_epochs})"
            )
        return self


class StorageConfig(Strict):
    """Where results go: a local directory or a pyarrow filesystem URI (``s3://...``)."""

    path: str = "lrsearch-runs"


class ResourcesConfig(Strict):
    """Resources of one trial (fractional GPUs pack several trials on one device)."""

    cpu: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    gpu: NonNegFloat = 0.0


class TrackingConfig(Strict):
    """MLflow: tracking URI (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db``) and experiment."""

    uri: str | None = None
    experiment: str | None = None


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class JobConfig(Strict):
    """A whole job file."""

    name: str
    task: TaskConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    range_test: RangeTestConfig = Field(default_factory=RangeTestConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    #: directory of the job file; relative paths in the job resolve against it
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value

    def search_space(self, bounds: tuple[float, float] | None = None) -> SearchSpace:
        """The space this job searches; ``bounds`` are the range test's (``None`` before it runs).

        Raises:
            ConfigError: the space file or the job's overrides make an invalid space.
        """
        sp = self.space
        base = load_space(self.resolve(sp.file) if sp.file else sp.family)
        return resolve_space(
            base,
            bounds=bounds if self.range_test.enabled else None,
            schedules=sp.schedules,
            max_lr=sp.max_lr,
            widen=sp.widen,
            weight_decay=sp.weight_decay,
            layer_decay=sp.layer_decay,
        )

    def results_dir(self) -> str:
        """``STORAGE/NAME``: relative storage paths are relative to the working directory (like
        ``./lrsearch-runs``); URIs such as ``s3://bucket/runs`` are kept as they are."""
        base = self.storage.path
        if "://" in base:
            return base.rstrip("/") + "/" + self.name
        if not Path(base).is_absolute() and in_ray_job():
            # a submitted job's working directory is a temporary copy Ray may delete: keep results
            # in the home directory of the node the search runs on
            return str(Path.home() / base / self.name)
        return str(Path(base).resolve() / self.name)

    def resolve(self, path: str) -> str:
        """``path`` relative to the job file's directory (absolute paths and URIs unchanged)."""
        if "://" in path or Path(path).is_absolute():
            return path
        return str(Path(self.base_dir) / path)


def in_ray_job() -> bool:
    """True inside the entrypoint of a job submitted through the Ray Jobs API."""
    import os

    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _field_path(loc: tuple[Any, ...]) -> str:
    # pydantic puts the union member's tag in the location ('task', 'text_classification', 'x'):
    # users wrote 'task.x'.
    parts = [str(p) for p in loc if p not in _TAGS]
    return ".".join(parts) or "(top level)"




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
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None and part == "task":
            continue
        if model is None:
            return "?"
    if model is None or not hasattr(model, "model_fields"):
        return "?"
    return ", ".join(k for k in model.model_fields if k != "base_dir")


_TASK_MODELS = {
    "synthetic": SyntheticTask,
    "text_classification": TextClassificationTask,
    "image_classification": ImageClassificationTask,
    "python": PythonTask,
}
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
        lines = [f"{source}: {_describe(e, data)}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    try:
        job.search_space()  # a bad space fails here, before anything starts
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return job


def load_job(path: str | Path) -> JobConfig:
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
