"""The ``python`` task kind: the user's own function returning a :class:`Task`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from lrsearch.errors import TaskError
from lrsearch.job.config import resolve_path
from lrsearch.tasks.base import Task


def python_task(entrypoint: str, options: dict[str, Any], *, path: str | None = None) -> Task:
    """Import ``package.module:function`` and call it with ``options``; it must return a Task.

    Args:
        entrypoint: ``"package.module:function"``.
        options: keyword arguments for the function.
        path: a directory put on ``sys.path`` first (the job file's directory by default), so a
            task module can sit next to the job file.
    """
    task = call_entrypoint(entrypoint, options, path)
    if not isinstance(task, Task):
        raise TaskError(
            f"task.entrypoint: {entrypoint} returned {type(task).__name__}, not lrsearch.tasks.Task"
            + (" (a Trainer, a Lightning module or a train_fn is searched by `lrsearch search`; "
               "a final run needs a Task)" if callable(task) or isinstance(task, tuple) else "")
        )
    return task


def load_entrypoint(entrypoint: str, path: str | None = None) -> Callable[..., Any]:
    """The function ``package.module:function`` names (``path`` put on ``sys.path`` first)."""
    module_name, _, func_name = entrypoint.partition(":")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(
            f"task.entrypoint: cannot import module {module_name!r} (from {entrypoint!r}): {exc}; "
            f"put it next to the job file, set task.path, or install it"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TaskError(
            f"task.entrypoint: module {module_name!r} has no function {func_name!r} (from {entrypoint!r})"
        )
    return func


def call_entrypoint(entrypoint: str, options: dict[str, Any], path: str | None = None) -> Any:
    """Call the job's entrypoint with its ``options``: whatever it returns."""
    func = load_entrypoint(entrypoint, path)
    try:
        return func(**options)
    except TypeError as exc:
        raise TaskError(f"task.options: {entrypoint} does not accept {sorted(options)}: {exc}") from None


def entry_part(entrypoint: str, options: dict[str, Any], path: str | None, index: int) -> Any:
    """Part ``index`` of what the entrypoint returns (a Lightning module and its data module)."""
    return call_entrypoint(entrypoint, options, path)[index]


def run_entry_loop(entrypoint: str, options: dict[str, Any], path: str | None, trial: Any) -> Any:
    """One trial of the ``train_fn`` the entrypoint returns."""
    return call_entrypoint(entrypoint, options, path)(trial)


def python_loop(cfg: Any, base_dir: str) -> tuple[str, Any]:
    """What a ``python`` task's entrypoint (``cfg``: the job's task section, its path relative to
    ``base_dir``) gives a search, by what it returns (called once here):

    - ``("task", Task)``: the built-in loop on that task;
    - ``("trainer", factory)``: a ``transformers.Trainer``; each trial calls the entrypoint again;
    - ``("lightning", (module_factory, datamodule_factory))``: a ``LightningModule``, or a
      ``(LightningModule, LightningDataModule)`` pair;
    - ``("train_fn", fn)``: a function ``fn(trial)``, the user's own loop.

    Raises:
        TaskError: it returned something else.
    """
    path = resolve_path(base_dir, cfg.path) if cfg.path else base_dir
    got = call_entrypoint(cfg.entrypoint, cfg.options, path)
    bound = (cfg.entrypoint, dict(cfg.options), path)
    if isinstance(got, Task):
        return "task", got
    if _is(got, "transformers", "Trainer"):
        return "trainer", partial(call_entrypoint, *bound)
    if isinstance(got, tuple) and len(got) == 2 and _is(got[0], "lightning", "LightningModule"):
        return "lightning", (partial(entry_part, *bound, 0), partial(entry_part, *bound, 1))
    if _is(got, "lightning", "LightningModule"):
        raise TaskError(f"task.entrypoint: {cfg.entrypoint} returned a LightningModule alone; allowed: "
                        "(module, datamodule), so that each trial has its data")
    if callable(got):
        # each worker imports the module from the job's path again (its imports of modules next
        # to it too) rather than receiving the function by value
        return "train_fn", partial(run_entry_loop, *bound)
    raise TaskError(f"task.entrypoint: {cfg.entrypoint} returned {type(got).__name__}; allowed: an "
                    "lrsearch.Task, a transformers.Trainer, a (LightningModule, LightningDataModule) "
                    "pair, or a function train_fn(trial)")


def _is(obj: Any, package: str, name: str) -> bool:
    """``isinstance(obj, package.name)``, without importing ``package`` when it is not loaded."""
    module = sys.modules.get(package)
    return module is not None and isinstance(obj, getattr(module, name))
