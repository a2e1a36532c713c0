"""``lrsearch find-lr``: the LR range test on a job's task and optimizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lrsearch.engine.trial import steps_per_epoch
from lrsearch.job.config import JobConfig, OptimizerConfig, RangeTestConfig, SearchConfig
from lrsearch.optim.optimizers import build_optimizer
from lrsearch.optim.recipe import Recipe
from lrsearch.range_test import RangeTestResult, lr_range_test
from lrsearch.tasks import Task, build_task, reseed


def default_device() -> torch.device:
    """CUDA when this process was given a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def range_test_steps(num_steps: int | str, search: SearchConfig, steps_per_epoch: int) -> int:
    """The range test's length: ``num_steps`` (``range_test.num_steps``), or for ``auto`` 5 % of the
    most the search's trials can train (``num_trials x max_epochs x steps_per_epoch``), within 30..100."""
    if num_steps != "auto":
        return int(num_steps)
    return int(min(100, max(30, round(0.05 * search.num_trials * search.max_epochs * steps_per_epoch))))


def range_test_smooth(smooth: float | str, num_steps: int) -> float:
    """``smooth`` (``range_test.smooth``), or for ``auto`` 5 / num_steps (at most 0.2): the same share
    of the sweep whatever its length."""
    return min(0.2, 5.0 / num_steps) if smooth == "auto" else float(smooth)


def find_lr(
    job: JobConfig,
    *,
    task: Task | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
    device: torch.device | str | None = None,
) -> tuple[Task, RangeTestResult]:
    """Run the job's range test on a fresh model of its task, with the trials' training recipe
    (``train``: clipping, precision, accumulation). Returns the task and the result."""
    task = task or build_task(job)
    per_epoch = steps_per_epoch(task, job.train.gradient_accumulation_steps, job.search.max_steps_per_epoch)
    num_steps = range_test_steps(job.range_test.num_steps, job.search, per_epoch)
    recipe = Recipe.of(job.train, job.accumulation_steps())
    result = measure(task, job.optimizer, job.range_test, recipe, num_steps, seed=job.search.seed,
                     progress=progress, device=device)
    return task, result


def measure(task: Task, optimizer: OptimizerConfig, settings: RangeTestConfig, recipe: Recipe, num_steps: int, *,
            seed: int, progress: Callable[[int, int, float, float], None] | None = None,
            device: torch.device | str | None = None) -> RangeTestResult:
    """The range test of ``num_steps`` optimizer steps on a fresh model of ``task``: ``settings``
    (the job's ``range_test`` section) sweep the LR, ``recipe`` trains each step. The same seed
    gives the same curve and bounds in any process."""
    reseed(task, seed)
    model = task.build_model()
    return lr_range_test(
        model,
        build_optimizer(optimizer, model, settings.start_lr),
        task.criterion,
        task.train_loader,
        start_lr=settings.start_lr,
        end_lr=settings.end_lr,
        num_steps=num_steps,
        mode=settings.mode.value,
        smooth=range_test_smooth(settings.smooth, num_steps),
        diverge_factor=settings.diverge_factor,
        val_loader=task.val_loader if settings.use_validation else None,
        accumulation_steps=recipe.accumulation_steps,
        device=device or default_device(),
        progress=progress,
        max_grad_norm=recipe.max_grad_norm,
        precision=recipe.precision,
    )


def local_dir(results_dir: str, name: str) -> Path:
    """Where plots and JSON go: the results directory, or ``./lrsearch-runs/NAME`` for an
    ``s3://`` one (they need a local directory)."""
    return Path(results_dir) if "://" not in results_dir else Path("lrsearch-runs") / name


def _paths(out_dir: Path, plot: str | Path | None) -> tuple[Path, Path]:
    return (Path(plot) if plot else out_dir / "range_test.png"), out_dir / "range_test.json"


def save_range_test(out_dir: Path, name: str, task_name: str, result: RangeTestResult,
                    plot: str | Path | None = None) -> dict[str, Any]:
    """Write the plot and ``range_test.json`` into ``out_dir`` (:func:`local_dir`); return a
    JSON-able summary of the range test of the job ``name``."""
    plot_path, json_path = _paths(out_dir, plot)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result.settings["task"] = task_name
    result.plot(str(plot_path), title=f"LR range test: {task_name}")
    json_path.write_text(json.dumps(result.to_dict(), indent=1))
    return range_test_summary(out_dir, name, result, plot)


def range_test_summary(out_dir: Path, name: str, result: RangeTestResult,
                       plot: str | Path | None = None) -> dict[str, Any]:
    """What ``find-lr`` prints: suggestions, bounds, where the plot and data are."""
    plot_path, json_path = _paths(out_dir, plot)
    data = result.to_dict()
    return {"job": name, "task": result.settings.get("task", name),
            "suggestions": data["suggestions"], "bounds": data["bounds"],
            "stop_reason": data["stop_reason"], "num_steps_run": len(data["lrs"]),
            "plot": str(plot_path), "results": str(json_path), "range_test": data}
