"""MLflow for final runs (``lrsearch train``): reading the search back, the final run, its model.

A final run is one MLflow run nested under the search's parent run (tag ``lrsearch.role: final``),
so the UI shows it with the search it came from. Its model is logged with MLflow's ``pytorch``
flavour and, when asked, registered as a Model Registry version tagged with the config and the
search's run id.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lrsearch.console import err
from lrsearch.errors import SearchError, TrackingError
from lrsearch.infra.tracking.read import find_search_run
from lrsearch.infra.tracking.store import (
    PARENT_TAG,
    ROLE_TAG,
    _client,
    _retry,
    check_reachable,
)
from lrsearch.redact import redact_uri

FINAL_ROLE = "final"
SEARCH_RUN_TAG = "lrsearch.search_run_id"


def read_search(uri: str, *, experiment: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """A finished search from MLflow: ``{run_id, experiment_id, best, trials, mode}``.

    ``trials`` are the rows of its ``trials.parquet``; ``experiment`` picks its latest search.

    Raises:
        TrackingError: no such run or experiment, or no search in it.
        SearchError: the search has no completed trial (nothing to train), or is still running.
    """
    client = _client(uri)
    check_reachable(uri)
    if run_id:
        run = find_search_run(uri, run_id=run_id)
        if run.data.tags.get(ROLE_TAG) != "search":
            raise TrackingError(f"--run-id: run {run_id!r} at {uri} is not an lrsearch search")
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments(max_results=50)]
            raise TrackingError(f"--experiment: no experiment {experiment!r} at {uri}; there are: "
                                f"{', '.join(names) or 'none'} (run `lrsearch search` first)")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'search'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise TrackingError(f"--experiment: no search in experiment {experiment!r} at {uri} "
                                "(run `lrsearch search` first)")
        run = runs[0]
    rid, name = run.info.run_id, run.info.run_name
    artifacts = {a.path for a in client.list_artifacts(rid)}
    if "best_config.yaml" not in artifacts:
        if run.info.status == "RUNNING":
            raise SearchError(f"search run {rid} ({name}) is still running; train once it has finished")
        raise SearchError(f"search run {rid} ({name}) has no completed trial: nothing to train "
                          "(every trial was pruned, diverged or failed); search again with more "
                          "trials or a wider space")
    with tempfile.TemporaryDirectory() as tmp:
        best = yaml.safe_load(Path(client.download_artifacts(rid, "best_config.yaml", tmp)).read_text())
        trials: list[dict[str, Any]] = []
        mode = None
        if "trials.parquet" in artifacts:
            import pyarrow.parquet as pq

            trials = pq.read_table(client.download_artifacts(rid, "trials.parquet", tmp)).to_pylist()
        if "summary.json" in artifacts:
            mode = json.loads(Path(client.download_artifacts(rid, "summary.json", tmp)).read_text()).get("mode")
    return {"run_id": rid, "experiment_id": run.info.experiment_id, "best": best, "trials": trials,
            "mode": mode}


class FinalRun:
    """The MLflow run of one final run (created on the driver, logged into from the Ray worker)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id

    @classmethod
    def start(cls, uri: str, *, experiment_id: str, search_run_id: str | None, job_name: str,
              params: dict[str, Any], run_id: str | None = None) -> FinalRun:
        """A new run nested under the search's parent, or the run ``run_id`` continued (resume)."""
        client = _client(uri)
        check_reachable(uri)
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                return cls(uri, run_id)
            except Exception:
                pass  # deleted: a new run
        tags = {ROLE_TAG: FINAL_ROLE, "lrsearch.job": job_name}
        if search_run_id:
            tags.update({PARENT_TAG: search_run_id, SEARCH_RUN_TAG: search_run_id})
        run = client.create_run(experiment_id, run_name=f"{job_name}-final", tags=tags)
        final = cls(uri, run.info.run_id)
        final.log(params=params)
        return final

    def log(self, *, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
            tags: dict[str, Any] | None = None, step: int = 0,
            series: tuple[str, list[float], int] | None = None) -> None:
        """Log now (retried); a store that stays down loses these figures, never the training.
        ``series``: ``(key, values, first step)``, one value a step (the LR at every optimizer step)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        if series is not None:
            key, values, first = series
            ms += [Metric(key, float(v), now, first + i) for i, v in enumerate(values)]
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        client = _client(self.uri)
        try:
            # MLflow's log_batch limits: 1000 metrics, 100 params + tags per call
            calls = max(1, math.ceil(len(ms) / 1000), math.ceil(len(ps) / 100))
            for i in range(calls):
                _retry(lambda i=i: client.log_batch(self.run_id, metrics=ms[1000 * i:1000 * (i + 1)],
                                                    params=ps[100 * i:100 * (i + 1)],
                                                    tags=ts if i == 0 else [], synchronous=True))
        except Exception as exc:
            self._lost("the final run's figures", exc)

    def log_artifact(self, path: Path) -> None:
        """A file of the run (its ``best_config.yaml``), retried; a store that stays down loses it."""
        try:
            _retry(lambda: _client(self.uri).log_artifact(self.run_id, str(path)))
        except Exception as exc:
            self._lost(path.name, exc)

    def _lost(self, what: str, exc: Exception) -> None:
        err.print(f"[yellow]warning:[/] MLflow at {redact_uri(self.uri)} did not take {what} "
                  f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})", highlight=False)

    def log_model(self, model: Any, *, register: str | None, tags: dict[str, str],
                  input_example: Any = None) -> tuple[str, dict | None]:
        """Log ``model`` (MLflow's pytorch flavour, pickled) into this run; register it as
        ``register``. An ``input_example`` (a numpy batch) gives it a signature, so that
        ``mlflow models serve`` takes JSON inputs.

        Returns:
            The model's URI and ``{"name", "version"}`` of the registered version (or ``None``).
        """
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.uri)
        requirements = _requirements(model)
        try:
            with mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
                info = mlflow.pytorch.log_model(model, name="model", registered_model_name=register,
                                                pip_requirements=requirements, serialization_format="pickle",
                                                input_example=input_example)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise TrackingError(f"MLflow at {redact_uri(self.uri)} did not take the final model ({first})") from None
        registered = None
        if register:
            version = str(info.registered_model_version)
            client = _client(self.uri)
            for key, value in tags.items():
                _retry(lambda k=key, v=value: client.set_model_version_tag(register, version, k, v))
            registered = {"name": register, "version": version,
                          "uri": f"models:/{register}/{version}"}
        return info.model_uri, registered

    def logged_epochs(self, key: str) -> int:
        """The last step of ``key`` this run holds (0 if none, or the store is down): a resumed run
        retrains the epochs after its last checkpoint and does not log those twice."""
        try:
            history = _client(self.uri).get_metric_history(self.run_id, key)
        except Exception:
            return 0
        return max((m.step for m in history), default=0)

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run as ``status``; whether the store took it (if not, the caller records the end
        in the run's ``state.json``, and :func:`lrsearch.infra.tracking.heal` sets it later)."""
        client = _client(self.uri)
        try:
            _retry(lambda: client.set_terminated(self.run_id, status))
            return True
        except Exception:
            return False


def _requirements(model: Any) -> list[str]:
    """The distributions whose classes make up ``model`` (torch, transformers, ...), pinned to the
    installed versions: what loading the pickled model needs. (MLflow's own inference re-imports
    the model in a subprocess: slow, and it warns.)"""
    from importlib import metadata

    modules = {type(m).__module__.split(".")[0] for m in model.modules()} | {"torch"}
    owners = metadata.packages_distributions()
    pins = set()
    for module in modules:
        for dist in owners.get(module, []):
            try:
                pins.add(f"{dist}=={metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                continue
    return sorted(pins)
