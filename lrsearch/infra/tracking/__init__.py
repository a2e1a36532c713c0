"""MLflow tracking: a parent run per search, a nested child run per trial. Only module importing mlflow.

Where: ``tracking.uri`` of the job, else ``MLFLOW_TRACKING_URI``, else MLflow's own default
``sqlite:///mlflow.db`` in the working directory (an earlier lrsearch's ``./mlruns.db`` while there is
no ``./mlflow.db``). Experiment: ``tracking.experiment``, else the job's name. A sqlite store's
artifacts go to ``mlruns/EXPERIMENT/`` next to its database file (a server's: where the server says).

Resilience: every logging call is retried with back-off; what still fails (the tracking server
is down) is written as a small JSON file under ``RESULTS/mlflow-spool/`` (local or any pyarrow
filesystem) and replayed, in order, by the next successful call of the same run, at the end of the
search (which tries a store that is down for up to ``tracking.flush_timeout_s``), or by :func:`heal`,
which the next ``lrsearch`` command on the job runs first (and ``lrsearch sync``). The end of a run
is recorded next to the results, so a run the store missed it of never stays RUNNING once the store
is back. Nothing is silently lost. Child runs are found by their trial id
tag, so a retried or resumed trial re-attaches to its run instead of creating another.
"""

from lrsearch.errors import TrackingError
from lrsearch.infra.tracking.read import (
    find_past_search,
    find_search_run,
    read_best_config,
    read_trial_runs,
)
from lrsearch.infra.tracking.runs import (
    SearchTracker,
    TrialLogger,
    heal,
    load_tracking_info,
    sync_spool,
)
from lrsearch.infra.tracking.store import TrackingInfo, check_reachable, resolve_tracking

__all__ = [
    "SearchTracker",
    "TrackingError",
    "TrackingInfo",
    "TrialLogger",
    "check_reachable",
    "find_past_search",
    "find_search_run",
    "heal",
    "load_tracking_info",
    "read_best_config",
    "read_trial_runs",
    "resolve_tracking",
    "sync_spool",
]
