"""Tasks: what a range test or a trial trains.

A :class:`Task` knows how to build a fresh model, the train and validation loaders, the loss and
the metric with its direction. Built-in tasks live one per module in this package.
"""

from lrsearch.tasks.base import Task, evaluate
from lrsearch.tasks.synthetic import synthetic_task

__all__ = ["Task", "evaluate", "synthetic_task"]
