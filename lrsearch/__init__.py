"""lrsearch: find the learning-rate strategy for fine-tuning a pretrained network.

    import lrsearch
    res = lrsearch.search("job.yaml")        # or a dict, a JobConfig; task=<your Task or factory>
    res.best, res.trials, res.importances
    lrsearch.export(res, format="hf")
    final = lrsearch.train("job.yaml", res, epochs=9)   # the model you ship, scored on held-out test data

See :mod:`lrsearch.api` for the functions, :mod:`lrsearch.optim.schedules` and :mod:`lrsearch.range_test`
for the schedule and range-test libraries. Names are imported on first use, so that the CLI's
``--help`` does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "search": "lrsearch.api", "find_lr": "lrsearch.api", "load_job": "lrsearch.job.parse",
    "export": "lrsearch.api", "Exported": "lrsearch.api", "train": "lrsearch.api",
    "FinalResult": "lrsearch.final",
    "JobConfig": "lrsearch.job.config",
    "ConfigError": "lrsearch.errors", "Interrupted": "lrsearch.errors",
    "LRSearchError": "lrsearch.errors", "SearchError": "lrsearch.errors", "TaskError": "lrsearch.errors",
    "RangeTestResult": "lrsearch.range_test", "lr_range_test": "lrsearch.range_test",
    "SCHEDULES": "lrsearch.optim.schedules", "build_scheduler": "lrsearch.optim.schedules",
    "Task": "lrsearch.tasks", "Trial": "lrsearch.engine.protocol",
    "BestConfig": "lrsearch.output.results", "SearchResult": "lrsearch.output.results",
    "TrialRecord": "lrsearch.output.results", "TrialState": "lrsearch.output.results",
}
__all__ = [
    "SCHEDULES", "BestConfig", "ConfigError", "Exported", "FinalResult", "Interrupted", "JobConfig", "LRSearchError",
    "RangeTestResult", "SearchError", "SearchResult", "Task", "TaskError", "Trial", "TrialRecord", "TrialState",
    "__version__", "build_scheduler", "export", "find_lr", "load_job", "lr_range_test", "search",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lrsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from lrsearch.api import Exported, export, find_lr, search, train
    from lrsearch.engine.protocol import Trial
    from lrsearch.errors import ConfigError, Interrupted, LRSearchError, SearchError, TaskError
    from lrsearch.final import FinalResult
    from lrsearch.job.config import JobConfig
    from lrsearch.job.parse import load_job
    from lrsearch.optim.schedules import SCHEDULES, build_scheduler
    from lrsearch.output.results import BestConfig, SearchResult, TrialRecord, TrialState
    from lrsearch.range_test import RangeTestResult, lr_range_test
    from lrsearch.tasks import Task
