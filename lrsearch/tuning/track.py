"""What a search logs on its MLflow parent run: the setup before the trials, the results after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lrsearch.config import JobConfig
from lrsearch.tracking import SearchTracker
from lrsearch.tuning.results import SearchResult, TrialState


def log_setup(tracker: SearchTracker, job: JobConfig, task_name: str, metric: str, out: Path | None,
              range_test: dict | None, space: Any) -> None:
    """Job file, resolved space and range test on the parent run."""
    s = job.search
    params: dict[str, Any] = {
        "task": task_name, "task.kind": job.task.kind, "metric": metric,
        "optimizer": job.optimizer.name.value, "num_trials": s.num_trials, "max_epochs": s.max_epochs,
        "algorithm": s.algorithm, "early_stopping": s.early_stopping,
        "grace_period": s.grace_period, "reduction_factor": s.reduction_factor,
        "space.family": space.family, "space.schedules": ",".join(space.schedules),
        "space.max_lr_low": space.max_lr_prior.low, "space.max_lr_high": space.max_lr_prior.high,
    }
    metrics: dict[str, float] = {}
    if range_test:
        for method, lr in range_test["suggestions"].items():
            if lr is not None:
                params[f"range_test.{method}"] = lr
                metrics[f"range_test.{method}"] = lr
        low, high = range_test["bounds"]
        params.update({"range_test.bounds_low": low, "range_test.bounds_high": high,
                       "range_test.stop_reason": range_test["stop_reason"]})
        metrics.update({"range_test.bounds_low": low, "range_test.bounds_high": high})
    tracker.log_params(params)
    if metrics:
        tracker.log_metrics(metrics)
    if out is None:
        return
    job_file = out / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    space_file = out / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False))
    tracker.log_artifact(job_file)
    tracker.log_artifact(space_file)
    for name in ("range_test.png", "range_test.json"):
        if (out / name).is_file():
            tracker.log_artifact(out / name, "range_test")


def log_results(tracker: SearchTracker, result: SearchResult, out: Path | None, total_steps: int) -> None:
    """Counts, importances, plots, the trial table and best config on the parent run; the final
    state on every child run; then close the parent run."""
    from lrsearch.report import plot_lr_curves, plot_search

    c = result.counts
    tracker.log_metrics({f"trials_{k}": float(v) for k, v in c.items()})
    if result.importances:
        tracker.log_metrics({f"importance.{k.replace('/', '.')}": v for k, v in result.importances.items()})
    if result.best is not None:
        b = result.best
        tracker.log_metrics({f"best_{result.metric}": b.value})
        tracker.log_params({"best.schedule": b.schedule, "best.max_lr": b.max_lr, "best.trial_id": b.trial_id})
    if out is not None:
        plot_search(result.trials, str(out / "search.png"), result.metric)
        ranked = sorted((t for t in result.trials if t.state is TrialState.COMPLETED),
                        key=lambda t: t.final_metric, reverse=result.mode == "max")
        plot_lr_curves(ranked, str(out / "lr_curves_top.png"), total_steps)
        for name in ("trials.parquet", "search.png", "lr_curves_top.png", "best_config.yaml",
                     "summary.json", "optuna_trials.json"):
            if (out / name).is_file():
                tracker.log_artifact(out / name)
    tracker.finish_trials([{"trial_id": t.trial_id, "state": t.state.value,
                           "stopped_at_epoch": t.stopped_at_epoch} for t in result.trials])
    pending = tracker.finish(ok=c["errored"] < c["total"])
    result.paths["mlflow_pending"] = str(pending)
