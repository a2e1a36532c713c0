"""MLflow tracking: a parent run per search, a nested child run per trial. Only module importing mlflow.

Where: ``tracking.uri`` of the job, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns.db`` in the
working directory. Experiment: ``tracking.experiment``, else the job's name.

Resilience: every logging call is retried with back-off; what still fails (the tracking server
is down) is written as a small JSON file under ``RESULTS/mlflow-spool/`` (local or any pyarrow
filesystem) and replayed, in order, by the next successful call of the same run, at the end of the
search, or by ``lrsearch sync``. Nothing is silently lost. Child runs are found by their trial id
tag, so a retried or resumed trial re-attaches to its run instead of creating another.
"""

from lrsearch.errors import TrackingError
from lrsearch.tracking.read import (
    find_past_search,
    find_search_run,
    read_best_config,
    read_trial_runs,
)
from lrsearch.tracking.runs import SearchTracker, TrialLogger, load_tracking_info, sync_spool
from lrsearch.tracking.store import TrackingInfo, check_reachable, resolve_tracking

__all__ = [
    "SearchTracker",
    "TrackingError",
    "TrackingInfo",
    "TrialLogger",
    "check_reachable",
    "find_past_search",
    "find_search_run",
    "load_tracking_info",
    "read_best_config",
    "read_trial_runs",
    "resolve_tracking",
    "sync_spool",
]
