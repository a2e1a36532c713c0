"""``lrsearch find-lr``: the LR range test on a job's task and optimizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lrsearch.config import JobConfig
from lrsearch.optim import build_optimizer
from lrsearch.range_test import RangeTestResult, lr_range_test
from lrsearch.tasks import Task, build_task, reseed


def default_device() -> torch.device:
    """CUDA when this process was given a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def range_test_steps(job: JobConfig, task: Task) -> int:
    """The range test's length: ``range_test.num_steps``, or for ``auto`` 5 % of the most the
    search's trials can train (``num_trials x max_epochs x steps per epoch``), within 30..100."""
    from lrsearch.trial import steps_per_epoch

    steps = job.range_test.num_steps
    if steps != "auto":
        return steps
    s = job.search
    return int(min(100, max(30, round(0.05 * s.num_trials * s.max_epochs * steps_per_epoch(job, task)))))


def range_test_smooth(job: JobConfig, num_steps: int) -> float:
    """``range_test.smooth``, or for ``auto`` 5 / num_steps (at most 0.2): the same share of the
    sweep whatever its length."""
    smooth = job.range_test.smooth
    return min(0.2, 5.0 / num_steps) if smooth == "auto" else smooth


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
    reseed(task, job.search.seed)  # the same job gives the same curve and bounds in any process
    cfg = job.range_test
    num_steps = range_test_steps(job, task)
    model = task.build_model()
    optimizer = build_optimizer(job.optimizer, model, cfg.start_lr)
    result = lr_range_test(
        model,
        optimizer,
        task.criterion,
        task.train_loader,
        start_lr=cfg.start_lr,
        end_lr=cfg.end_lr,
        num_steps=num_steps,
        mode=cfg.mode.value,
        smooth=range_test_smooth(job, num_steps),
        diverge_factor=cfg.diverge_factor,
        val_loader=task.val_loader if cfg.use_validation else None,
        accumulation_steps=job.accumulation_steps(),
        device=device or default_device(),
        progress=progress,
        max_grad_norm=job.train.max_grad_norm,
        precision=job.train.precision,
    )
    return task, result


def _paths(job: JobConfig, plot: str | Path | None) -> tuple[Path, Path]:
    results = job.results_dir()
    # plots and JSON need a local directory; with s3:// storage they go to ./lrsearch-runs/NAME
    out_dir = Path(results) if "://" not in results else Path("lrsearch-runs") / job.name
    return (Path(plot) if plot else out_dir / "range_test.png"), out_dir / "range_test.json"


def save_range_test(job: JobConfig, task_name: str, result: RangeTestResult,
                    plot: str | Path | None = None) -> dict[str, Any]:
    """Write the plot and ``range_test.json`` under ``STORAGE/NAME/``; return a JSON-able summary."""
    plot_path, json_path = _paths(job, plot)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result.settings["task"] = task_name
    result.plot(str(plot_path), title=f"LR range test: {task_name}")
    json_path.write_text(json.dumps(result.to_dict(), indent=1))
    return range_test_summary(job, result, plot)


def range_test_summary(job: JobConfig, result: RangeTestResult, plot: str | Path | None = None) -> dict[str, Any]:
    """What ``find-lr`` prints: suggestions, bounds, where the plot and data are."""
    plot_path, json_path = _paths(job, plot)
    data = result.to_dict()
    return {"job": job.name, "task": result.settings.get("task", job.name),
            "suggestions": data["suggestions"], "bounds": data["bounds"],
            "stop_reason": data["stop_reason"], "num_steps_run": len(data["lrs"]),
            "plot": str(plot_path), "results": str(json_path), "range_test": data}
