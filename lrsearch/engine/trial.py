"""One trial: fine-tune the task's pretrained model with the trial's LR strategy, report per epoch.

:func:`run_trial` is the Ray Tune trainable (a function trainable; everything it receives pickles).
It gets the task from a :class:`TaskSource` (built from the job on the worker, or the caller's
in-memory task shipped by Ray), builds the optimizer at ``max_lr`` and the schedule over the
trial's full budget (``max_epochs`` epochs), trains the job's recipe's way (:mod:`lrsearch.optim.recipe`:
clipping, precision, accumulation), evaluates after every epoch and reports the
metric, train loss and LR with a checkpoint, so an interrupted search resumes where each trial
stopped. (Where the search's saved state names a checkpoint Tune had already replaced, the resume
leaves a ``replay.json`` in its place and the trial retrains those epochs, unreported, first.)
A NaN/inf loss, or a smoothed loss above ``search.diverge_factor`` x its first value, stops the
trial at once: it reports ``diverged=True`` and the worst metric value, and ends (the search goes on).
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lrsearch.engine import EpochEnd, Horizon, fit
from lrsearch.engine.protocol import Trial, TrialPlan, objective_key, worst_metric
from lrsearch.errors import ConfigError, TaskError
from lrsearch.infra.tracking import TrackingInfo
from lrsearch.job.config import OptimizerConfig
from lrsearch.job.space import schedule_params
from lrsearch.job.task_config import TaskConfig
from lrsearch.optim.optimizers import build_optimizer, for_schedule
from lrsearch.optim.recipe import Stepper
from lrsearch.optim.schedules import build_scheduler
from lrsearch.tasks import Task, task_from

#: tasks this worker process has built or received, by TaskSource.key (one at a time)
_TASKS: dict[str, Task] = {}


@dataclass(frozen=True)
class TaskSource:
    """Where a trial gets its task: built from the job's task section (``cfg``, its paths relative
    to ``base_dir``), or the caller's own (a ``Task`` or a zero-argument factory), shipped to the
    workers by Ray's cloudpickle. A worker keeps the task it got for the trials after (loading a
    pretrained model and tokenising take seconds)."""

    key: str
    cfg: TaskConfig | None
    base_dir: str
    task: Task | Callable[[], Task] | None = None

    @classmethod
    def of(cls, cfg: TaskConfig | None, base_dir: str, task: Task | Callable[[], Task] | None = None) -> TaskSource:
        if task is None:
            # base_dir too: the same section in another folder names other files
            return cls(f"{base_dir}:{cfg.model_dump_json() if cfg is not None else None}", cfg, base_dir)
        if not isinstance(task, Task) and not callable(task):
            raise ConfigError(f"task: got {type(task).__name__}; allowed: an lrsearch.Task, "
                              "a function returning one, or None (build the job's task)")
        _ship_by_value(task)
        return cls(uuid.uuid4().hex, cfg, base_dir, task)

    @staticmethod
    def prime(cfg: TaskConfig, base_dir: str, task: Task) -> None:
        """Keep ``task``, already built from the section ``cfg`` here, for the search's own :meth:`get`."""
        _TASKS.clear()
        _TASKS[TaskSource.of(cfg, base_dir).key] = task

    def get(self) -> Task:
        if self.key not in _TASKS:
            _TASKS.clear()
            _TASKS[self.key] = _build(self)
        return _TASKS[self.key]


def _ship_by_value(task: Task | Callable[[], Task]) -> None:
    """Make Ray send the code of a task defined in the user's script or notebook, not a reference.

    cloudpickle sends functions of ``__main__`` by value, but those of any other module by name, and
    a Ray worker cannot import a script that is not on its path (a test file, ``my_experiment.py``
    run from elsewhere). Modules installed in the environment stay by reference.
    """
    from ray import cloudpickle  # Ray: imported where a task is shipped, not at start-up

    funcs = [task] if not isinstance(task, Task) else [task.build_model, task.criterion, task.layer_groups,
                                                        task.evaluate_fn]
    # the standard library too: a functools.partial names "functools" as its module, and functools
    # by value would take its locks into every pickle after
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    for fn in funcs:
        while isinstance(fn, functools.partial):
            fn = fn.func
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        path = getattr(module, "__file__", None)
        if module is None or path is None or module.__name__ == "__main__":
            continue
        if not any(path.startswith(p) for p in installed) and not module.__name__.startswith("lrsearch"):
            cloudpickle.register_pickle_by_value(module)


def _build(source: TaskSource) -> Task:
    if source.task is None:
        return task_from(source.cfg, source.base_dir)
    task = source.task if isinstance(source.task, Task) else source.task()
    if not isinstance(task, Task):
        raise TaskError(f"task: the factory returned {type(task).__name__}, not lrsearch.Task")
    return task


def metric_key(task: Task) -> str:
    """The name of the metric trials report and the search optimises, e.g. ``val_accuracy``."""
    return f"val_{task.metric}"


def worst_value(task: Task) -> float:
    """What a diverged trial reports: finite (Optuna and ASHA rank it last), never NaN."""
    return worst_metric(metric_key(task), task.mode)


def loader_steps(task: Task, accumulate: int) -> int:
    """Optimizer steps in one pass over the train loader: its batches // ``accumulate`` (the
    recipe's gradient accumulation).

    Raises:
        ConfigError: the loader has fewer batches than one optimizer step accumulates.
    """
    n = len(task.train_loader)
    if n < accumulate:
        raise ConfigError(f"train.gradient_accumulation_steps: got {accumulate}; the train loader has "
                          f"{n} batch{'es' if n != 1 else ''} per epoch, so at most {n} is allowed")
    return n // accumulate


def steps_per_epoch(task: Task, accumulate: int, cap: int | None = None) -> int:
    """Optimizer steps in one trial epoch: :func:`loader_steps`, capped at ``cap`` (the search's
    ``max_steps_per_epoch``)."""
    n = loader_steps(task, accumulate)
    return min(n, cap) if cap else n


def trial_horizon(task: Task, accumulate: int, cap: int | None, max_epochs: int) -> Horizon:
    """A trial's length: ``max_epochs`` epochs of :func:`steps_per_epoch` optimizer steps each."""
    return Horizon.of_epochs(steps_per_epoch(task, accumulate, cap), max_epochs)


def build_run(optimizer_config: OptimizerConfig, task: Task, config: dict[str, Any], device: torch.device,
              total: int):
    """Model, optimizer, scheduler and schedule parameters for one config (``optimizer_config``: the
    job's ``optimizer`` section), the schedule spanning ``total`` optimizer steps. The schedule's
    fractions become steps through :func:`lrsearch.job.space.schedule_params`, the conversion the export
    gives users."""
    model = task.build_model().to(device)
    optimizer = build_optimizer(for_schedule(optimizer_config, config["schedule"]), model, float(config["max_lr"]),
                                weight_decay=config.get("weight_decay"), layer_groups=task.layer_groups,
                                layer_decay=float(config.get("layer_decay", 1.0)))
    params = schedule_params(config, total)
    scheduler = build_scheduler(optimizer, config["schedule"], total, **params)
    return model, optimizer, scheduler, params


@dataclass(frozen=True)
class UserLoop:
    """A search's own training loop: ``fn(trial)`` runs one trial (:class:`~lrsearch.Trial`);
    ``metric`` / ``mode`` are the objective it reports."""

    fn: Callable[[Trial], Any]
    metric: str = "val_accuracy"
    mode: str = "max"

    @property
    def name(self) -> str:
        """What the search's MLflow run names as its task: the loop's own name, or an entrypoint's."""
        fn = self.fn
        if getattr(fn, "__qualname__", None):
            return fn.__qualname__
        if isinstance(fn, functools.partial):
            first = fn.args[0] if fn.args else None
            return first if isinstance(first, str) else getattr(fn.func, "__qualname__", "train_fn")
        return type(fn).__name__


def user_loop(fn: Callable[[Trial], Any] | None, metric: str | None = None,
              mode: str | None = None) -> UserLoop | None:
    """The search's own loop ``fn`` with its objective (default ``accuracy``, ``max``), checked."""

    if fn is None:
        if metric is not None or mode is not None:
            raise ConfigError("metric / mode: only with train_fn= (a task's metric is its own)")
        return None
    if not callable(fn):
        raise ConfigError(f"train_fn: got {type(fn).__name__}; allowed: a function fn(trial) that "
                          "trains one trial")
    if mode not in (None, "max", "min"):
        raise ConfigError(f"mode: got {mode!r}; allowed: 'max' or 'min'")
    metric = metric or "accuracy"
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"metric: got {metric!r}; allowed: the name of a metric the loop reports")
    _ship_by_value(fn)
    return UserLoop(fn, objective_key(metric), mode or ("min" if "loss" in metric else "max"))


def run_trial(config: dict[str, Any], source: TaskSource, plan: TrialPlan, tracking: TrackingInfo | None = None,
              loop: UserLoop | None = None) -> None:
    """Ray Tune trainable: one trial of the search (logged to its own nested MLflow run), run by
    the built-in loop on the job's task (:func:`task_loop`) or by the user's ``loop``."""
    from ray import tune

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    torch.manual_seed(plan.training.seed)
    if loop is not None:
        trial = Trial(config, plan, metric=loop.metric, mode=loop.mode, tracking=tracking,
                      checkpoint=tune.get_checkpoint())
        loop.fn(trial)
        return
    task = source.get()
    trial = Trial(config, plan, metric=metric_key(task), mode=task.mode, tracking=tracking,
                  checkpoint=tune.get_checkpoint())
    task_loop(trial, task)


def task_loop(trial: Trial, task: Task) -> None:
    """The built-in loop on the trial protocol: the task's pretrained model trained by the engine
    (:func:`lrsearch.engine.fit`: the job's recipe, the divergence stop at every step, an
    evaluation after every epoch), each epoch reported through the trial."""
    device = trial.device
    model = task.build_model().to(device)
    optimizer = trial.optimizer(model, layer_groups=task.layer_groups)
    horizon = trial_horizon(task, trial.recipe.accumulation_steps, trial.max_steps_per_epoch, trial.max_epochs)
    scheduler = trial.scheduler(optimizer, horizon.total_steps)
    stepper = Stepper(trial.recipe, model, optimizer, task.criterion, device)
    trial.track(stepper=stepper)
    fit(task, stepper, scheduler, trial.monitor, horizon, seed=trial.seed, sink=TrialSink(trial),
        start_epoch=trial.start_epoch)


@dataclass(frozen=True)
class TrialSink:
    """The engine's epochs reported through the trial protocol (to Ray Tune, its MLflow run and
    its checkpoints)."""

    trial: Trial

    def replaying(self, epoch: int) -> bool:
        return self.trial.replaying(epoch)

    def end_epoch(self, end: EpochEnd) -> bool:
        if end.diverged:
            return self.trial.report(end.epoch, train_loss=end.train_loss, diverged=True)
        if end.scores is None:  # replayed: reported unevaluated, ignored
            return self.trial.report(end.epoch)
        return self.trial.report(end.epoch, train_loss=end.train_loss, **end.scores)
