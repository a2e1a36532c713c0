"""The job's schema: one YAML file describes a search, as the typed sections below.

:mod:`lrsearch.job.parse` reads and validates it (the only place YAML is read); every other module
receives a :class:`JobConfig` or the sections it uses.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lrsearch.errors import ConfigError
from lrsearch.job.space import (
    FAMILIES,
    Range,
    SearchSpace,
    end_warmup_by,
    load_space,
    resolve_space,
)
from lrsearch.job.task_config import (
    NonNegFloat,
    PositiveInt,
    Strict,
    TaskConfig,
)

__all__ = [
    "JobConfig",
    "OptimizerConfig",
    "RangeTestConfig",
    "TaskConfig",
    "TrainConfig",
]

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


# --------------------------------------------------------------------------------------------
# optimizer, range test
# --------------------------------------------------------------------------------------------


class OptimizerName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    #: schedulefree.AdamWScheduleFree (Defazio et al., 2024): no decay schedule to search, so pair it
    #: with ``constant`` (its warmup the schedule's warmup_frac)
    adamw_schedulefree = "adamw_schedulefree"


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
    #: ``auto``: 5 % of the search's most compute (trials x epochs x steps per epoch), from 30 to
    #: 100 steps, so the test never eats a tiny search's budget; ``lrsearch train --range-test``:
    #: a quarter of the run's optimizer steps, at least 12.5 a decade of LR. An integer sets both.
    num_steps: Annotated[int, Field(ge=2)] | Literal["auto"] = "auto"
    mode: SweepMode = SweepMode.exp
    #: EMA weight of the newest loss; ``auto``: 5 / num_steps, at most 0.2 (0.05 at 100 steps)
    smooth: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = "auto"
    diverge_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 4.0
    #: batches per optimizer step; default: the job's ``train.gradient_accumulation_steps``
    accumulation_steps: PositiveInt | None = None
    use_validation: bool = False

    @field_validator("end_lr")
    @classmethod
    def _order(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("start_lr")
        if start is not None and value <= start:
            raise ValueError(f"must be greater than start_lr ({start:g})")
        return value


class TrainConfig(Strict):
    """The training recipe the range test, every trial and the final run share (and the export
    carries): gradient clipping, mixed precision and gradient accumulation."""

    #: clip the gradients' global norm to this before each optimizer step; ``null``: no clipping.
    #: 1.0 is the Hugging Face Trainer's default, so a config found here trains the same there
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = 1.0
    #: ``fp32``; ``bf16`` autocast (CPU or CUDA); ``fp16`` autocast with a gradient scaler (CUDA only)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: batches whose gradients add up to one optimizer step (the schedule counts optimizer steps)
    gradient_accumulation_steps: PositiveInt = 1
    #: recompute BatchNorm's running statistics at the current weights before every evaluation of the
    #: built-in loop and the final run (a plain mean over up to 32 training batches, no gradients;
    #: nothing for a model without BN): a fine-tune of a few hundred steps at BN momentum 0.01
    #: (EfficientNet) is otherwise evaluated with mostly pretraining statistics (BENCHMARKS.md: +20
    #: points of test accuracy on tiny image). Always done for adamw_schedulefree (its averaged
    #: weights never saw a batch)
    recompute_bn: bool = True


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


class BudgetConfig(Strict):
    """``search.budget``: one of trial-epochs, GPU-hours (``resources.gpu`` x a trial's seconds) or
    wall seconds; the search starts no trial it cannot pay for (:mod:`lrsearch.tuning.budget`)."""

    trial_epochs: PositiveInt | None = None
    gpu_hours: PositiveFloat | None = None
    wall_s: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one(self) -> BudgetConfig:
        given = {k: v for k, v in self.model_dump().items() if v is not None}
        if len(given) > 1:
            raise ValueError("allowed: one of trial_epochs, gpu_hours or wall_s")
        return self

    def limit(self) -> tuple[str, float] | None:
        """``(kind, value)``, or ``None`` when no budget is set."""
        return next(((k, v) for k, v in self.model_dump().items() if v is not None), None)


class SearchConfig(Strict):
    """Ray Tune + Optuna settings: the sampler, early stopping, budget and divergence stop."""

    #: Optuna's sampler: ``tpe`` (Tree-structured Parzen Estimator) or ``random``
    algorithm: Literal["tpe", "random"] = "tpe"
    #: ``asha`` stops the worse trials at rungs (``grace_period`` x ``reduction_factor``^k epochs);
    #: ``none`` trains every trial its full budget
    early_stopping: Literal["asha", "none"] = "asha"
    #: what ASHA ranks trials by at its rungs: the search's ``objective`` (the task's metric), or
    #: ``val_loss``, which is continuous where accuracy on a small validation set moves in steps of
    #: one example; the search still optimises, reports and picks the best by the objective
    rung_metric: Literal["objective", "val_loss"] = "objective"
    #: configs to try first, e.g. ``{max_lr: 5.0e-5, schedule: linear, warmup_frac: 0.0}``
    start_points: list[dict[str, Any]] = Field(default_factory=list)
    #: earlier searches whose finished trials seed this one's study: experiment names (each one's
    #: latest finished search) or MLflow run ids, read from this job's tracking store
    warm_start: list[str] = Field(default_factory=list)
    num_trials: PositiveInt = 12
    max_epochs: PositiveInt = 3
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[float, Field(ge=2, allow_inf_nan=False)] = 2
    max_concurrent_trials: PositiveInt = 2
    #: stop the search at this compute: ``{trial_epochs: N}``, ``{gpu_hours: H}`` or ``{wall_s: S}``
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    #: the same as ``budget: {wall_s: ...}`` (kept for existing job files)
    time_budget_s: PositiveFloat | None = None
    seed: int = 0
    #: a trial stops, diverged, once its smoothed loss exceeds this multiple of its first loss
    diverge_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 4.0
    #: EMA weight of the newest loss in that smoothing (bias-corrected, as in the range test)
    diverge_smooth: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.1
    max_steps_per_epoch: PositiveInt | None = None
    max_failures: Annotated[int, Field(ge=0)] = 2
    #: when a trial saves what resume needs (its trainable weights, optimizer and schedule state):
    #: ``rungs`` at ASHA's rungs (without ASHA: epochs 1, 2, 4, 8...), ``epoch`` after every epoch,
    #: ``none`` never (an interrupted trial retrains from its start, seeded: the same trajectory)
    checkpoint: Literal["rungs", "epoch", "none"] = "rungs"
    #: once the search has finished keep the best trial's final weights ("best"), every trial's
    #: last checkpoint ("all") or none ("none")
    keep_checkpoints: Literal["best", "all", "none"] = "best"

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        if value is None:
            return {}  # ``budget: null``: none
        if not isinstance(value, dict | BudgetConfig):
            raise ValueError("allowed: {trial_epochs: N}, {gpu_hours: H} or {wall_s: S}")
        return value

    @field_validator("start_points")
    @classmethod
    def _start_points(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, point in enumerate(value):
            lr = point.get("max_lr")
            if not isinstance(lr, int | float) or isinstance(lr, bool) or not 0 < lr < float("inf"):
                raise ValueError(f"start_points[{i}].max_lr: needs a number > 0 (got {lr!r})")
            if not isinstance(point.get("schedule"), str):
                raise ValueError(f"start_points[{i}].schedule: needs a schedule name (got {point.get('schedule')!r})")
        return value

    @field_validator("warm_start", mode="before")
    @classmethod
    def _warm_start(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]  # one earlier search
        if isinstance(value, list):
            for i, ref in enumerate(value):
                if not isinstance(ref, str) or not ref.strip():
                    raise ValueError(f"allowed: experiment names or run ids of earlier searches (entry {i} is {ref!r})")
        return value

    @model_validator(mode="after")
    def _grace_le_max(self) -> SearchConfig:
        if self.grace_period > self.max_epochs:
            raise ValueError(
                f"grace_period ({self.grace_period}) must be at most max_epochs ({self.max_epochs})"
            )
        return self

    def budget_limit(self) -> tuple[str, float] | None:
        """The budget as ``(kind, value)`` (``time_budget_s`` is ``wall_s``), or ``None``."""
        return self.budget.limit() or (("wall_s", self.time_budget_s) if self.time_budget_s else None)


class StorageConfig(Strict):
    """Where results go: a local directory or a pyarrow filesystem URI (``s3://...``)."""

    path: str = "lrsearch-runs"


class ResourcesConfig(Strict):
    """Resources of one trial (fractional GPUs pack several trials on one device)."""

    cpu: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    gpu: NonNegFloat = 0.0
    #: when no node of the cluster can hold one trial, wait this long for one to join (added by the
    #: cluster's autoscaler), then fail; default: 0 on a Ray the search started itself (nothing
    #: can join it), 600 on a cluster it joined (autoscaling GPU workers often start at zero)
    wait_for_node_s: NonNegFloat | None = None


class TrackingConfig(Strict):
    """MLflow: tracking URI (default ``MLFLOW_TRACKING_URI``, else MLflow's own default
    ``sqlite:///mlflow.db`` in the working directory) and experiment."""

    uri: str | None = None
    experiment: str | None = None
    #: a search that ends while the tracking server is down keeps trying to log what is pending
    #: for this long (seconds), then says so; the next lrsearch command on the job logs the rest
    flush_timeout_s: NonNegFloat = 60.0


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class JobConfig(Strict):
    """A whole job file."""

    name: str
    #: what the built-in loop trains; a search with its own loop (``train_fn=``, an integration)
    #: may leave it out, or keep it for the range test
    task: TaskConfig | None = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    range_test: RangeTestConfig = Field(default_factory=RangeTestConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
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

    def accumulation_steps(self) -> int:
        """Batches per optimizer step of the range test (``range_test.accumulation_steps``, else the
        training recipe's)."""
        return self.range_test.accumulation_steps or self.train.gradient_accumulation_steps

    def search_space(self, bounds: tuple[float, float] | None = None) -> SearchSpace:
        """The space this job searches; ``bounds`` are the range test's (``None`` before it runs).

        Raises:
            ConfigError: the space file or the job's overrides make an invalid space.
        """
        sp = self.space
        base = load_space(self.resolve(sp.file) if sp.file else sp.family)
        space = resolve_space(
            base,
            bounds=bounds if self.range_test.enabled else None,
            schedules=sp.schedules,
            max_lr=sp.max_lr,
            widen=sp.widen,
            weight_decay=sp.weight_decay,
            layer_decay=sp.layer_decay,
        )
        if "schedule_free" in space.schedules and self.optimizer.name == OptimizerName.sgd:
            # the arm trains AdamWScheduleFree: not an SGD job's; dropped unless the job asked for it
            if sp.schedules and "schedule_free" in sp.schedules:
                raise ConfigError("space.schedules: 'schedule_free' trains AdamWScheduleFree and needs an "
                                  "Adam-family optimizer; got optimizer.name: sgd")
            rest = {k: v for k, v in space.schedules.items() if k != "schedule_free"}
            space = space.model_copy(update={"schedules": rest})
        s = self.search
        if s.early_stopping == "asha" and s.grace_period < s.max_epochs:
            # no trial is judged at a rung before its warmup / pct_start has ended
            space = end_warmup_by(space, s.grace_period / s.max_epochs)
        return space

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
        return resolve_path(self.base_dir, path)


def resolve_path(base_dir: str, path: str) -> str:
    """``path`` relative to ``base_dir`` (absolute paths and URIs unchanged)."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str(Path(base_dir) / path)


def in_ray_job() -> bool:
    """True inside the entrypoint of a job submitted through the Ray Jobs API."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
