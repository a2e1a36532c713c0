"""What a search logs on its MLflow parent run: the setup before the trials, the results after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lrsearch.infra.tracking import SearchTracker
from lrsearch.output.report import plot_lr_curves, plot_search, warm_start_line
from lrsearch.output.results import SearchResult, TrialState
from lrsearch.redact import redact_uri


def log_setup(tracker: SearchTracker, job_data: dict[str, Any], task_name: str, metric: str, out: Path | None,
              range_test: dict | None, space: Any) -> None:
    """The job file (``job_data``: the job as JSON), the resolved space and the range test on the parent run."""
    s = job_data["search"]
    params: dict[str, Any] = {
        "task": task_name, "task.kind": job_data["task"]["kind"] if job_data["task"] else "-", "metric": metric,
        "optimizer": job_data["optimizer"]["name"], "num_trials": s["num_trials"], "max_epochs": s["max_epochs"],
        "algorithm": s["algorithm"], "early_stopping": s["early_stopping"],
        "grace_period": s["grace_period"], "reduction_factor": s["reduction_factor"],
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
    data = dict(job_data, tracking=dict(job_data["tracking"]))
    if data["tracking"]["uri"]:
        data["tracking"]["uri"] = redact_uri(data["tracking"]["uri"])  # the artifact holds no credential
    job_file.write_text(yaml.safe_dump(data, sort_keys=False))
    space_file = out / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False))
    tracker.log_artifact(job_file)
    tracker.log_artifact(space_file)
    for name in ("range_test.png", "range_test.json"):
        if (out / name).is_file():
            tracker.log_artifact(out / name, "range_test")


def log_warm_start(tracker: SearchTracker, report: dict[str, Any], out: Path | None) -> None:
    """What ``search.warm_start`` reused, on the parent run: counts and sources as params, the
    summary line as the tag ``lrsearch.warm_start``, the whole report (dropped trials by reason)
    as ``warm_start.json``."""

    tracker.log_params({
        "warm_start.sources": ",".join(f"{s['ref']}:{s['run_id']}" for s in report["sources"]),
        "warm_start.reused": report["reused"], "warm_start.dropped": report["dropped"],
    })
    tracker.log({"op": "batch", "tags": {"lrsearch.warm_start": warm_start_line(report)[:5000]}})
    if out is not None and (out / "warm_start.json").is_file():
        tracker.log_artifact(out / "warm_start.json")


def log_progress(tracker: SearchTracker, progress: dict[str, Any]) -> None:
    """Progress on the parent run at a trial's end (a :meth:`~lrsearch.tuning.budget.Ledger.snapshot`):
    metrics stepped by trials done; the budget and the forecast end as tags (a resume may change them)."""
    metrics = {"progress.trials_done": progress["trials_done"], "progress.trial_epochs": progress["trial_epochs"],
               "progress.gpu_hours": progress["gpu_hours"]}
    tags = {"lrsearch.forecast_end": progress["forecast_end"] or "unknown"}
    b = progress["budget"]
    if b:
        metrics.update({"budget.spent": b["spent"], "budget.remaining": b["remaining"]})
        tags["lrsearch.budget"] = f"{b['kind']}={b['limit']:g}"
    tracker.log_metrics(metrics, step=progress["trials_done"])
    tracker.log({"op": "batch", "tags": tags})


def _has_params(tracker: SearchTracker, params: dict[str, Any]) -> bool:
    """Whether the parent run holds any of ``params`` already (a resumed search's)."""
    try:
        logged = tracker.client.get_run(tracker.run_id()).data.params
    except Exception:  # the store is down: the spool keeps the order, the params go after
        return False
    return any(k in logged for k in params)


def log_results(tracker: SearchTracker, result: SearchResult, out: Path | None, total_steps: int) -> None:
    """Counts, importances, plots, the trial table and best config on the parent run; the final
    state on every child run; then close the parent run."""

    c = result.counts
    tracker.log_metrics({f"trials_{k}": float(v) for k, v in c.items()})
    if result.progress:
        log_progress(tracker, result.progress)
    if result.importances:
        tracker.log_metrics({f"importance.{k.replace('/', '.')}": v for k, v in result.importances.items()})
    if result.best is not None:
        b = result.best
        tracker.log_metrics({f"best_{result.metric}": b.value})
        best = {"best.schedule": b.schedule, "best.max_lr": b.max_lr, "best.trial_id": b.trial_id}
        tracker.log({"op": "batch", "tags": best})
        if not _has_params(tracker, best):
            # MLflow never changes a param: a search resumed with a larger budget may have found
            # another best (the tags above follow it); a refused param would block the run's spool
            tracker.log_params(best)
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
