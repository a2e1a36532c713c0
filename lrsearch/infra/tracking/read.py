"""Reading a finished search back from MLflow (for ``lrsearch export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lrsearch.errors import TrackingError
from lrsearch.infra.tracking.store import PARENT_TAG, ROLE_TAG, SEARCH_TAG, _client, check_reachable


def find_search_run(uri: str, *, experiment: str | None = None, run_id: str | None = None,
                    final_itself: bool = False) -> Any:
    """The search's parent run: ``run_id``'s (a trial's or a final run's search) or the latest in
    ``experiment``. With ``final_itself`` (the export) a final run is its own answer: its
    ``best_config.yaml`` is the config it trained."""
    client = _client(uri)
    check_reachable(uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception:
            raise TrackingError(f"--run-id: no run {run_id!r} at {uri}") from None
        role = run.data.tags.get(ROLE_TAG)
        if final_itself and role == "final" and "best_config.yaml" in {a.path for a in client.list_artifacts(run_id)}:
            return run  # what it trained (before 2026-12-03 a final run logged none: its search's)
        if role in ("trial", "final"):  # a trial's or a final run's search
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


def search_results_dir(uri: str, *, experiment: str | None = None, run_id: str | None = None) -> str | None:
    """The results directory (tag ``lrsearch.results``) of the search ``run_id`` names (a trial's or
    a final run's search), or of ``experiment``'s latest search; ``None`` when the store cannot say."""
    client = _client(uri)
    try:
        if run_id:
            run = client.get_run(run_id)
            if run.data.tags.get(ROLE_TAG) in ("trial", "final"):
                run = client.get_run(run.data.tags[PARENT_TAG])
        else:
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'search'",
                                      order_by=["attributes.start_time DESC"], max_results=1) if exp else []
            if not runs:
                return None
            run = runs[0]
    except Exception:
        return None  # no such run, or the store is down: the export says which
    return run.data.tags.get("lrsearch.results")


def latest_final_run(uri: str, search_run: Any) -> Any | None:
    """The latest finished final run (``lrsearch train``) of a search that logged the config it
    kept (``best_config.yaml``), or ``None``."""
    client = _client(uri)
    runs = client.search_runs([search_run.info.experiment_id],
                              filter_string=f"tags.`{ROLE_TAG}` = 'final' and tags.`{PARENT_TAG}` = "
                                            f"'{search_run.info.run_id}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if "best_config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}:
            return run
    return None


def read_best_config(uri: str, run_id: str) -> dict[str, Any]:
    import tempfile

    import yaml

    client = _client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "best_config.yaml", tmp)
        return yaml.safe_load(Path(path).read_text())



def find_past_search(uri: str, ref: str) -> Any:
    """The parent run of an earlier search named by ``ref`` (for ``search.warm_start``): an
    experiment's latest finished search, or a run id (a search's, or one of its trials').

    Raises:
        LookupError: no such experiment or run, the run is not a search, or the experiment holds
            no finished search; the message says which.
    """
    client = _client(uri)
    check_reachable(uri)
    exp = client.get_experiment_by_name(ref)
    if exp is not None:
        runs = client.search_runs(
            [exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`{ROLE_TAG}` = 'search' and attributes.status = 'FINISHED'")
        if not runs:
            raise LookupError(f"experiment {ref!r} at {uri} holds no finished search")
        return runs[0]
    try:
        run = client.get_run(ref)
    except Exception:
        names = [e.name for e in client.search_experiments(max_results=50)]
        raise LookupError(f"no experiment or run {ref!r} at {uri} (experiments there: "
                          f"{', '.join(names) or 'none'})") from None
    role = run.data.tags.get(ROLE_TAG)
    if role == "trial":
        run = client.get_run(run.data.tags[PARENT_TAG])
    elif role != "search":
        raise LookupError(f"run {ref!r} at {uri} is not an lrsearch search (its {ROLE_TAG} tag is {role!r})")
    if run.info.status != "FINISHED":
        raise LookupError(f"search run {run.info.run_id} at {uri} has not finished (status {run.info.status})")
    return run


def read_trial_runs(uri: str, search_run: Any, metric: str) -> list[dict[str, Any]]:
    """Every trial child run of ``search_run``: its MLflow params, its ``lrsearch.state`` and
    ``lrsearch.stopped_at_epoch`` tags, and ``metric`` per epoch (``{epoch: value}``)."""

    client = _client(uri)
    search_id = search_run.data.tags.get(SEARCH_TAG)
    trials, token = [], None
    while True:
        runs = client.search_runs(
            [search_run.info.experiment_id], max_results=1000, page_token=token,
            order_by=["attributes.start_time ASC"], filter_string=f"tags.`{SEARCH_TAG}` = '{search_id}' and tags.`{ROLE_TAG}` = 'trial'")
        for run in runs:
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
            trials.append({"run_id": run.info.run_id, "params": dict(run.data.params),
                           "state": run.data.tags.get("lrsearch.state"),
                           "stopped_at_epoch": run.data.tags.get("lrsearch.stopped_at_epoch"),
                           "history": dict(sorted(history.items()))})
        token = runs.token
        if not token:
            return trials
