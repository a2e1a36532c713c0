"""Tasks: what a range test or a trial trains.

A :class:`Task` knows how to build a fresh pretrained model, the train and validation loaders, the
loss and the metric with its direction. Built-in tasks live one per module in this package;
:func:`build_task` turns a job's ``task`` section into a Task (on the driver, or again on each Ray
worker: the config pickles, the loaders need not).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from lrsearch.errors import ConfigError
from lrsearch.job.config import resolve_path
from lrsearch.job.extras import check_task
from lrsearch.tasks.base import Task, evaluate, reseed
from lrsearch.tasks.synthetic import synthetic_task
from lrsearch.tasks.user import python_task

if TYPE_CHECKING:
    from lrsearch.job.config import JobConfig
    from lrsearch.job.task_config import TaskConfig

__all__ = ["Task", "build_task", "evaluate", "reseed", "synthetic_task", "task_from"]


def _maybe_path(resolve: Callable[[str], str], value: str) -> str:
    # A value that names an existing file or directory relative to the job file (``resolve``: the
    # job's) is a path; anything else (a built-in alias, a hub id) is passed through unchanged.
    candidate = resolve(value)
    return candidate if Path(candidate).exists() else value


def build_task(job: JobConfig) -> Task:
    """Build the Task a job describes: its task section, paths relative to the job file.

    Raises:
        TaskError: the model or dataset cannot be loaded; the message says why and how to fix it.
    """
    return task_from(job.task, job.base_dir)


def task_from(cfg: TaskConfig | None, base_dir: str) -> Task:
    """Build the Task a job's task section (``cfg``) describes, its paths relative to ``base_dir``."""
    resolve = partial(resolve_path, base_dir)
    if cfg is None:
        raise ConfigError("task: missing; this job has no task section to build (allowed: a task "
                          "section, or a search with its own training loop)")
    check_task(cfg)  # a missing extra: one line naming the pip install that brings it
    options = cfg.model_dump(exclude={"kind"})
    if cfg.kind == "synthetic":
        return synthetic_task(**options)
    if cfg.kind == "text_classification":
        from lrsearch.tasks.text import text_classification_task  # transformers, on use

        options.update(model=_maybe_path(resolve, cfg.model), dataset=_maybe_path(resolve, cfg.dataset))
        return text_classification_task(**options)
    if cfg.kind == "language_modeling":
        from lrsearch.tasks.lm import language_modeling_task  # transformers, on use

        options.update(model=_maybe_path(resolve, cfg.model), dataset=_maybe_path(resolve, cfg.dataset))
        return language_modeling_task(**options)
    if cfg.kind == "image_classification":
        from lrsearch.tasks.image import image_classification_task  # torchvision, on use

        options.update(model=cfg.model, dataset=_maybe_path(resolve, cfg.dataset))
        if cfg.weights is not None:
            options["weights"] = resolve(cfg.weights)
        return image_classification_task(**options)

    return python_task(cfg.entrypoint, cfg.options,
                       path=resolve(cfg.path) if cfg.path else base_dir)
