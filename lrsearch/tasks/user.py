"""The ``python`` task kind: the user's own function returning a :class:`Task`."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lrsearch.errors import TaskError
from lrsearch.tasks.base import Task


def python_task(entrypoint: str, options: dict[str, Any], *, path: str | None = None) -> Task:
    """Import ``package.module:function`` and call it with ``options``; it must return a Task.

    Args:
        entrypoint: ``"package.module:function"``.
        options: keyword arguments for the function.
        path: a directory put on ``sys.path`` first (the job file's directory by default), so a
            task module can sit next to the job file.
    """
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
    try:
        task = func(**options)
    except TypeError as exc:
        raise TaskError(f"task.options: {entrypoint} does not accept {sorted(options)}: {exc}") from None
    if not isinstance(task, Task):
        raise TaskError(
            f"task.entrypoint: {entrypoint} returned {type(task).__name__}, not lrsearch.tasks.Task"
        )
    return task
