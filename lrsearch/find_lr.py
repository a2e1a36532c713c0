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


def find_lr(
    job: JobConfig,
    *,
    task: Task | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
    device: torch.device | str | None = None,
) -> tuple[Task, RangeTestResult]:
    """Run the job's range test on a fresh model of its task. Returns the task and the result."""
    task = task or build_task(job)
    reseed(task, job.search.seed)  # the same job gives the same curve and bounds in any process
    cfg = job.range_test
    model = task.build_model()
    optimizer = build_optimizer(job.optimizer, model, cfg.start_lr)
    result = lr_range_test(
        model,
        optimizer,
        task.criterion,
        task.train_loader,
        start_lr=cfg.start_lr,
        end_lr=cfg.end_lr,
        num_steps=cfg.num_steps,
        mode=cfg.mode.value,
        smooth=cfg.smooth,
        diverge_factor=cfg.diverge_factor,
        val_loader=task.val_loader if cfg.use_validation else None,
        accumulation_steps=cfg.accumulation_steps,
        device=device or default_device(),
        progress=progress,
    )
    return task, result


def save_range_test(job: JobConfig, task_name: str, result: RangeTestResult,
                    plot: str | Path | None = None) -> dict[str, Any]:
    """Write the plot and ``range_test.json`` under ``STORAGE/NAME/``; return a JSON-able summary."""
    results = job.results_dir()
    # plots and JSON need a local directory; with s3:// storage they go to ./lrsearch-runs/NAME
    out_dir = Path(results) if "://" not in results else Path("lrsearch-runs") / job.name
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = Path(plot) if plot else out_dir / "range_test.png"
    result.plot(str(plot_path), title=f"LR range test: {task_name}")
    data = result.to_dict()
    (out_dir / "range_test.json").write_text(json.dumps(data, indent=1))
    return {"job": job.name, "task": task_name, "suggestions": data["suggestions"],
            "bounds": data["bounds"], "stop_reason": data["stop_reason"],
            "num_steps_run": len(data["lrs"]), "plot": str(plot_path),
            "results": str(out_dir / "range_test.json"), "range_test": data}
