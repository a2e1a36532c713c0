"""Reading a finished search back from MLflow (for ``lrsearch export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lrsearch.errors import TrackingError
from lrsearch.tracking.store import PARENT_TAG, ROLE_TAG, _client, check_reachable


def find_search_run(uri: str, *, experiment: str | None = None, run_id: str | None = None) -> Any:
    """The parent run to export from: ``run_id`` or the latest search in ``experiment``."""
    client = _client(uri)
    check_reachable(uri)
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception:
            raise TrackingError(f"--run-id: no run {run_id!r} at {uri}") from None
        if run.data.tags.get(ROLE_TAG) in ("trial", "final"):  # a trial's or a final run's search
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

