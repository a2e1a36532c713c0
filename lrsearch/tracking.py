"""MLflow tracking: a parent run per search, a nested child run per trial. Only module importing mlflow.

Where: ``tracking.uri`` of the job, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db`` in the
working directory. Experiment: ``tracking.experiment``, else the job's name.

Resilience: every logging call is retried with back-off; what still fails (the tracking server
is down) is written as a small JSON file under ``RESULTS/mlflow-spool/`` (local or any pyarrow
filesystem) and replayed, in order, by the next successful call of the same run, at the end of the
search, or by ``lrsearch sync``. Nothing is silently lost. Child runs are found by their trial id
tag, so a retried or resumed trial re-attaches to its run instead of creating another.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrsearch import __version__
from lrsearch.errors import LRSearchError
from lrsearch.storage import filesystem, listing

__all__ = [
    "TrackingError",
    "TrackingInfo",
    "TrialLogger",
    "SearchTracker",
    "resolve_tracking",
    "sync_spool",
]

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "lrsearch.role"
TRIAL_TAG = "lrsearch.trial_id"
SEARCH_TAG = "lrsearch.search_id"
SPOOL = "mlflow-spool"
PARENT_KEY = "_search"


class TrackingError(LRSearchError):
    """Raised when the MLflow tracking store cannot be reached as a search starts, or a run or
    experiment asked for does not exist."""


@dataclass(frozen=True)
class TrackingInfo:
    """Everything a worker needs to log into a search's MLflow runs (pickles; no client inside)."""

    uri: str
    experiment_id: str
    parent_run_id: str
    search_id: str
    spool_dir: str


def resolve_tracking(uri: str | None, experiment: str | None, job_name: str) -> tuple[str, str]:
    """The tracking URI and experiment name a job uses."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # relative sqlite paths are relative to the working directory: make that explicit so
        # Ray workers (whose working directory differs) write to the same file
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri, experiment or job_name


def _quiet_http() -> None:
    # MLflow's own HTTP retries default to 7 with exponential back-off (minutes). lrsearch retries
    # itself and spools what fails, so keep each call short.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    # "Creating initial MLflow database tables..." and alembic's migration chatter
    for name in ("mlflow", "alembic"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


def _client(uri: str):
    _quiet_http()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _retry(fn: Callable[[], Any], *, tries: int = 3, delay: float = 0.5) -> Any:
    for attempt in range(tries):
        try:
            return fn()
        except Exception:
            if attempt == tries - 1:
                raise
            time.sleep(delay * 2**attempt)
    return None


def check_reachable(uri: str) -> None:
    """Fail fast, with one line, when the tracking store cannot be reached."""
    client = _client(uri)
    try:
        _retry(lambda: client.search_experiments(max_results=1), tries=2)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"tracking.uri: cannot reach the MLflow tracking store at {uri!r} ({first}); "
            "start it, or set tracking.uri / MLFLOW_TRACKING_URI to one that is up"
        ) from None


# --------------------------------------------------------------------------------------------
# Spool: operations that could not be logged, replayed later
# --------------------------------------------------------------------------------------------


def _spool_write(spool_dir: str, key: str, op: dict[str, Any]) -> None:
    fs, base = filesystem(spool_dir)
    folder = f"{base}/{key}"
    fs.create_dir(folder, recursive=True)
    # one file per operation, named so that sorting gives the order: no appends needed (S3-safe)
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    with fs.open_output_stream(f"{folder}/{name}") as out:
        out.write(json.dumps(op).encode())


def _spool_pending(spool_dir: str, key: str) -> list[tuple[str, dict[str, Any]]]:
    fs, base = filesystem(spool_dir)
    files = sorted(path for name, path in listing(fs, f"{base}/{key}", dirs=False).items()
                   if name.endswith(".json"))
    out = []
    for path in files:
        with fs.open_input_stream(path) as fh:
            out.append((path, json.loads(fh.read().decode())))
    return out


def _spool_keys(spool_dir: str) -> list[str]:
    fs, base = filesystem(spool_dir)
    return sorted(listing(fs, base, dirs=True))


def _spool_delete(spool_dir: str, path: str) -> None:
    fs, _ = filesystem(spool_dir)
    fs.delete_file(path)


# --------------------------------------------------------------------------------------------
# Applying operations
# --------------------------------------------------------------------------------------------


def _apply(client: Any, run_id: str, op: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "batch":
        metrics = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]))
                   for m in op.get("metrics", [])]
        params = [Param(k, str(v)[:6000]) for k, v in op.get("params", {}).items()]
        tags = [RunTag(k, str(v)) for k, v in op.get("tags", {}).items()]
        # MLflow's log_batch limits: 1000 metrics, 100 params + tags per call
        for i in range(0, max(1, len(metrics)), 1000):
            chunk = metrics[i:i + 1000]
            if chunk:
                client.log_batch(run_id, metrics=chunk, synchronous=True)
        pt = params + tags
        for i in range(0, len(pt), 100):
            part = pt[i:i + 100]
            client.log_batch(run_id, params=[p for p in part if isinstance(p, Param)],
                             tags=[t for t in part if isinstance(t, RunTag)], synchronous=True)
    elif kind == "artifact":
        if Path(op["path"]).exists():
            client.log_artifact(run_id, op["path"], op.get("artifact_path"))
    elif kind == "terminate":
        client.set_terminated(run_id, op["status"])
    else:  # pragma: no cover - written by this module only
        raise ValueError(f"unknown spooled operation {kind!r}")


def _metric(key: str, value: float, step: int) -> dict[str, Any]:
    return {"key": key, "value": float(value), "step": int(step), "timestamp": int(time.time() * 1000)}


class _RunLogger:
    """Logs into one run (found or created lazily); spools what fails; replays in order."""

    def __init__(self, info: TrackingInfo, key: str) -> None:
        self.info = info
        self.key = key
        self._client = None
        self._run_id: str | None = None
        self._down_until = 0.0

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.info.uri)
        return self._client

    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = self._find_or_create()
        return self._run_id

    def _find_or_create(self) -> str:
        raise NotImplementedError

    def log(self, op: dict[str, Any]) -> bool:
        """Log ``op`` now (after anything spooled before it); spool it if that fails."""
        if time.monotonic() < self._down_until:
            # the store failed moments ago: spool at once instead of stalling training on retries
            _spool_write(self.info.spool_dir, self.key, op)
            return False
        try:
            self.flush(raise_errors=True)
            _retry(lambda: _apply(self.client, self.run_id(), op))
            return True
        except Exception:
            self._down_until = time.monotonic() + 5.0
            _spool_write(self.info.spool_dir, self.key, op)
            return False

    def flush(self, *, raise_errors: bool = False) -> int:
        """Replay spooled operations in order; returns how many are still pending."""
        pending = _spool_pending(self.info.spool_dir, self.key)
        for i, (path, op) in enumerate(pending):
            try:
                _retry(lambda op=op: _apply(self.client, self.run_id(), op), tries=2)
            except Exception:
                if raise_errors:
                    raise
                return len(pending) - i
            _spool_delete(self.info.spool_dir, path)
        return 0


class TrialLogger(_RunLogger):
    """The child run of one trial, nested under the search's parent run (used on Ray workers)."""

    def __init__(self, info: TrackingInfo, trial_id: str, trial_name: str | None = None) -> None:
        super().__init__(info, trial_id)
        self.trial_name = trial_name or trial_id

    def _find_or_create(self) -> str:
        client = self.client
        found = client.search_runs(
            [self.info.experiment_id],
            filter_string=f"tags.`{TRIAL_TAG}` = '{self.key}' and tags.`{SEARCH_TAG}` = '{self.info.search_id}'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = client.create_run(
            self.info.experiment_id,
            run_name=self.trial_name,
            tags={PARENT_TAG: self.info.parent_run_id, TRIAL_TAG: self.key,
                  SEARCH_TAG: self.info.search_id, ROLE_TAG: "trial"},
        )
        return run.info.run_id

    def log_config(self, config: dict[str, Any], schedule_params: dict[str, Any]) -> None:
        params = {"max_lr": config["max_lr"], "schedule": config["schedule"]}
        params.update({f"{config['schedule']}.{k}": v for k, v in (config.get(config["schedule"]) or {}).items()})
        params.update({f"schedule_params.{k}": v for k, v in schedule_params.items()})
        for key in ("weight_decay", "layer_decay"):
            if key in config:
                params[key] = config[key]
        self.log({"op": "batch", "params": params})

    def logged_epochs(self, metric: str) -> int:
        """The last epoch this trial's run already holds (a resumed trial re-runs the epochs after
        Tune's last saved state; they are not logged twice). 0 if none, or the store is down."""
        try:
            history = self.client.get_metric_history(self.run_id(), metric)
        except Exception:
            return 0
        return max((m.step for m in history), default=0)

    def log_epoch(self, epoch: int, metrics: dict[str, float], lrs: list[float], first_step: int) -> None:
        batch = [_metric(k, v, epoch) for k, v in metrics.items()]
        batch += [_metric("lr_step", lr, first_step + i) for i, lr in enumerate(lrs)]
        self.log({"op": "batch", "metrics": batch})


class SearchTracker(_RunLogger):
    """The parent run of a search (driver side)."""

    def __init__(self, info: TrackingInfo) -> None:
        super().__init__(info, PARENT_KEY)
        self._run_id = info.parent_run_id

    def _find_or_create(self) -> str:  # the parent run always exists before this object
        return self.info.parent_run_id

    @classmethod
    def start(cls, *, uri: str, experiment: str, job_name: str, results_dir: str,
              resume: bool, tags: dict[str, str] | None = None) -> SearchTracker:
        """Check the store, then create the parent run (or re-attach to it on ``--resume``)."""
        check_reachable(uri)
        client = _client(uri)
        state_file = Path(results_dir) / "mlflow.json" if "://" not in results_dir else None
        if resume and state_file is not None and state_file.is_file():
            saved = json.loads(state_file.read_text())
            if saved.get("uri") == uri:
                info = TrackingInfo(uri, saved["experiment_id"], saved["run_id"], saved["search_id"],
                                    f"{results_dir}/{SPOOL}")
                try:
                    client.update_run(info.parent_run_id, status="RUNNING")
                    client.set_tag(info.parent_run_id, "lrsearch.state", "running (resumed)")
                except Exception as exc:
                    raise TrackingError(f"--resume: parent run {info.parent_run_id} not found at {uri}: {exc}") from None
                return cls(info)
        exp = client.get_experiment_by_name(experiment)
        # experimentKind: MLflow's UI opens a training experiment on its runs table (nested runs
        # expandable), not on the GenAI overview
        experiment_id = exp.experiment_id if exp else client.create_experiment(
            experiment, tags={"mlflow.experimentKind": "custom_model_development"})
        search_id = uuid.uuid4().hex[:12]
        all_tags = {ROLE_TAG: "search", SEARCH_TAG: search_id, "lrsearch.job": job_name,
                    "lrsearch.version": __version__, "lrsearch.results": results_dir}
        submission = os.environ.get("LRSEARCH_SUBMISSION_ID")  # set by lrsearch submit
        if submission:
            all_tags["ray.submission_id"] = submission
        all_tags.update(tags or {})
        run = client.create_run(experiment_id, run_name=f"{job_name}-{search_id[:6]}", tags=all_tags)
        info = TrackingInfo(uri, experiment_id, run.info.run_id, search_id, f"{results_dir}/{SPOOL}")
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({"uri": uri, "experiment_id": experiment_id,
                                              "run_id": run.info.run_id, "search_id": search_id}))
        return cls(info)

    def log_params(self, params: dict[str, Any]) -> None:
        self.log({"op": "batch", "params": params})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.log({"op": "batch", "metrics": [_metric(k, v, step) for k, v in metrics.items()]})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.log({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def finish_trials(self, trials: list[dict[str, Any]]) -> None:
        """Tag each trial's child run with its final state and close it (ASHA's stops happen on the
        driver; the worker never learns it was pruned)."""
        status = {"completed": "FINISHED", "pruned": "KILLED", "diverged": "FAILED", "errored": "FAILED"}
        self._close_abandoned({t["trial_id"] for t in trials})
        for t in trials:
            state = t["state"]
            label = f"pruned at rung {t['stopped_at_epoch']}" if state == "pruned" else state
            trial = TrialLogger(self.info, t["trial_id"])
            trial.log({"op": "batch", "tags": {"lrsearch.state": label, "lrsearch.stopped_at_epoch": t["stopped_at_epoch"]}})
            trial.log({"op": "terminate", "status": status[state]})

    def _close_abandoned(self, trial_ids: set[str]) -> None:
        # A trial that had started when the driver was killed, but that Ray Tune had not yet recorded
        # in its experiment state, is not resumed: Tune starts a new trial instead. Its child run
        # stays, marked as such, so nothing is silently dropped and nothing counts twice.
        try:
            runs = self.client.search_runs(
                [self.info.experiment_id],
                filter_string=f"tags.`{SEARCH_TAG}` = '{self.info.search_id}' and tags.`{ROLE_TAG}` = 'trial'",
                max_results=1000)
        except Exception:
            return  # the store is down: the trials' own logging is spooled, this tag can wait
        for run in runs:
            if run.data.tags.get(TRIAL_TAG) not in trial_ids:
                trial = TrialLogger(self.info, run.data.tags[TRIAL_TAG])
                trial.log({"op": "batch", "tags": {"lrsearch.state": "abandoned (search interrupted)"}})
                trial.log({"op": "terminate", "status": "KILLED"})

    def interrupted(self) -> int:
        """Mark the parent run stopped by the user (``--resume`` sets it running again)."""
        self.log({"op": "batch", "tags": {"lrsearch.state": "interrupted (resume with --resume)"}})
        self.log({"op": "terminate", "status": "KILLED"})
        return sync_spool(self.info)

    def finish(self, ok: bool = True) -> int:
        """Close the parent run and replay every spool; returns the number still pending."""
        self.log({"op": "batch", "tags": {"lrsearch.state": "finished" if ok else "failed"}})
        self.log({"op": "terminate", "status": "FINISHED" if ok else "FAILED"})
        return sync_spool(self.info)


def sync_spool(info: TrackingInfo) -> int:
    """Replay every spooled operation of a search; returns how many are still pending."""
    pending = 0
    for key in _spool_keys(info.spool_dir):
        logger = SearchTracker(info) if key == PARENT_KEY else TrialLogger(info, key)
        pending += logger.flush()
    return pending


def load_tracking_info(results_dir: str) -> TrackingInfo:
    """The tracking info a search saved in its results directory (for ``lrsearch sync``)."""
    state = Path(results_dir) / "mlflow.json"
    if not state.is_file():
        raise TrackingError(f"{results_dir}: no MLflow state (mlflow.json); was this a search's results directory?")
    saved = json.loads(state.read_text())
    return TrackingInfo(saved["uri"], saved["experiment_id"], saved["run_id"], saved["search_id"],
                        f"{results_dir}/{SPOOL}")


# --------------------------------------------------------------------------------------------
# Reading back (export)
# --------------------------------------------------------------------------------------------


def find_search_run(uri: str, *, experiment: str | None = None, run_id: str | None = None) -> Any:
    """The parent run to export from: ``run_id`` or the latest search in ``experiment``."""
    client = _client(uri)
    check_reachable(uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception:
            raise TrackingError(f"--run-id: no run {run_id!r} at {uri}") from None
        if run.data.tags.get(ROLE_TAG) == "trial":
            run = client.get_run(run.data.tags[PARENT_TAG])
        return run
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments(max_results=50)]
        raise TrackingError(f"--experiment: no experiment {experiment!r} at {uri}; there are: {', '.join(names) or 'none'}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if "best_config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}:
            return run
    raise TrackingError(f"--experiment: no finished search with a best config in {experiment!r} at {uri}")


def read_best_config(uri: str, run_id: str) -> dict[str, Any]:
    import tempfile

    import yaml

    client = _client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "best_config.yaml", tmp)
        return yaml.safe_load(Path(path).read_text())


def trial_runs(uri: str, parent_run_id: str) -> list[Any]:
    """The child runs nested under a search's parent run."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    client = _client(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
