"""The MLflow store: where it is, retried calls, the on-disk spool of what could not be logged,
and a logger for one run that replays the spool in order.

Credentials: MLflow's own client reads them from the environment (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` for a server running MLflow's basic-auth app, or ``MLFLOW_TRACKING_TOKEN``);
every node of a cluster has them in its own environment. lrsearch never copies them anywhere. A
tracking URI that carries them (``http://user:password@host``) is used as given to connect, and shown
or written only through :func:`lrsearch.redact.redact_uri`.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrsearch.console import err
from lrsearch.errors import TrackingError
from lrsearch.infra.storage import filesystem, listing
from lrsearch.redact import redact_uri

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "lrsearch.role"
TRIAL_TAG = "lrsearch.trial_id"
SEARCH_TAG = "lrsearch.search_id"
SPOOL = "mlflow-spool"
PARENT_KEY = "_search"


AUTH_HELP = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of the tracking "
             "server (or MLFLOW_TRACKING_TOKEN to its token)")
_CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
@dataclass(frozen=True)
class TrackingInfo:
    """Everything a worker needs to log into a search's MLflow runs (pickles; no client inside).

    ``uri`` is the store as shown and written to files (:func:`lrsearch.redact.redact_uri`); ``client_uri`` the one
    the client connects to, the same unless it carries credentials (held in memory only).
    """

    uri: str
    experiment_id: str
    parent_run_id: str
    search_id: str
    spool_dir: str
    client_uri: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, uri: str, experiment_id: str, parent_run_id: str, search_id: str,
           spool_dir: str) -> TrackingInfo:
        return cls(redact_uri(uri), experiment_id, parent_run_id, search_id, spool_dir, client_uri=uri)

    def connect_uri(self) -> str:
        return self.client_uri or self.uri


#: MLflow's own default store (``mlflow ui``, ``mlflow.search_runs()`` with no URI read it)
DEFAULT_STORE = "mlflow.db"
#: earlier lrsearch versions' default store: read (with a note) where it exists and ``mlflow.db`` does
#: not, so that upgrading hides no earlier search
OLD_STORE = "mlruns.db"
_noted: set[str] = set()


def default_store() -> str:
    """``sqlite:///mlflow.db`` in the working directory, as an absolute path (Ray workers have
    another working directory). An earlier lrsearch's ``./mlruns.db`` is used, with a note (once per
    process), where it exists and ``./mlflow.db`` does not."""
    old, new = Path(OLD_STORE), Path(DEFAULT_STORE)
    if old.is_file() and not new.exists():
        path = str(old.resolve())
        if path not in _noted:
            _noted.add(path)

            err.print(f"[yellow]note:[/] reading ./{OLD_STORE} from an earlier lrsearch; MLflow's default is "
                      f"./{DEFAULT_STORE}: mv {OLD_STORE} {DEFAULT_STORE} (and mlruns/ stays) so a bare "
                      "mlflow ui shows it", highlight=False, soft_wrap=True)
        return f"sqlite:///{path}"
    return f"sqlite:///{new.resolve()}"


def is_default_store(uri: str) -> bool:
    """Whether ``uri`` is MLflow's default store of the working directory (a bare ``mlflow ui``
    started here shows it)."""
    return uri == f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def resolve_tracking(uri: str | None, experiment: str | None, job_name: str) -> tuple[str, str]:
    """The tracking URI and experiment name a job uses: ``uri``, else ``MLFLOW_TRACKING_URI``, else
    :func:`default_store`."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # relative sqlite paths are relative to the working directory: make that explicit so
        # Ray workers (whose working directory differs) write to the same file
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri, experiment or job_name


def new_experiment(client: Any, uri: str, name: str, tags: dict[str, str] | None = None) -> str:
    """Create the experiment ``name``; returns its id. In a sqlite store its artifacts go to
    ``mlruns/NAME`` next to the database file: MLflow's own default, ``./mlruns`` of the creating
    process's working directory, would scatter a store's artifacts over wherever a command ran (a
    repository checkout included). For the default store that is the same ``./mlruns``."""
    location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0]).resolve()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or uuid.uuid4().hex[:12]
        location = str(db.parent / "mlruns" / slug)
    return client.create_experiment(name, artifact_location=location, tags=tags)


def _quiet_http() -> None:
    # MLflow's own HTTP retries default to 7 with exponential back-off (minutes). lrsearch retries
    # itself and spools what fails, so keep each call short.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    # "Creating initial MLflow database tables..." and alembic's migration chatter. MLflow sets its
    # root logger to INFO when imported, so quiet the module that says it; a level the user set stays.
    for name in ("mlflow.store.db.utils", "alembic"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


def _client(uri: str):
    _quiet_http()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail fast, with one line, when the tracking store cannot be reached or refuses the
    credentials (missing or wrong ones name the environment variables to set)."""
    client = _client(uri)
    try:
        _retry(lambda: client.search_experiments(max_results=1), tries=2)
    except Exception as exc:
        raise store_error(exc, uri) from None


def reachable(uri: str) -> bool:
    """Whether the store answers one cheap call now (none of lrsearch's retries: for polling a store
    that is down)."""
    try:
        _client(uri).search_experiments(max_results=1)
        return True
    except Exception:
        return False


_REFUSED = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def _retry(fn: Callable[[], Any], *, tries: int = 3, delay: float = 0.5) -> Any:
    for attempt in range(tries):
        try:
            return fn()
        except Exception as exc:
            # a refused login is not retried: the same credentials get the same answer
            if attempt == tries - 1 or getattr(exc, "error_code", None) in _REFUSED:
                raise
            time.sleep(delay * 2**attempt)
    return None


def store_error(exc: Exception, uri: str) -> TrackingError:
    """One line for a failed call to the store: a refused login names the variables to set."""
    shown = redact_uri(uri)
    code = getattr(exc, "error_code", None)
    if code == "UNAUTHENTICATED":
        sent = redact_uri(uri) != uri or any(os.environ.get(v) for v in _CREDENTIAL_VARS)
        what = "rejected the credentials" if sent else "requires a login and none was sent"
        return TrackingError(f"tracking.uri: the MLflow server at {shown!r} {what}; {AUTH_HELP}")
    if code == "PERMISSION_DENIED":
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        return TrackingError(f"tracking.uri: the MLflow server at {shown!r} denies this account"
                             f"{f' ({user!r})' if user else ''} access; ask its admin for permission, or "
                             f"{AUTH_HELP}")
    first = redact_uri(str(exc).strip().splitlines()[0][:300]) if str(exc).strip() else type(exc).__name__
    return TrackingError(
        f"tracking.uri: cannot reach the MLflow tracking store at {shown!r} ({first}); "
        "start it, or set tracking.uri / MLFLOW_TRACKING_URI to one that is up"
    )


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


def _spool_count(spool_dir: str) -> int:
    """How many operations wait in the spool (local listing only: no call to the store)."""
    fs, base = filesystem(spool_dir)
    return sum(sum(1 for name in listing(fs, path, dirs=False) if name.endswith(".json"))
               for path in listing(fs, base, dirs=True).values())


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


#: per store: until when (monotonic) it is taken as down after a failed call; shared by the run
#: loggers of a process, so that closing many runs while the store is down stalls once, not per run
_DOWN_UNTIL: dict[str, float] = {}


class _RunLogger:
    """Logs into one run (found or created lazily); spools what fails; replays in order."""

    def __init__(self, info: TrackingInfo, key: str) -> None:
        self.info = info
        self.key = key
        self._client = None
        self._run_id: str | None = None

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.info.connect_uri())
        return self._client

    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = self._find_or_create()
        return self._run_id

    def _find_or_create(self) -> str:
        raise NotImplementedError

    def log(self, op: dict[str, Any]) -> bool:
        """Log ``op`` now (after anything spooled before it); spool it if that fails."""
        if time.monotonic() < _DOWN_UNTIL.get(self.info.uri, 0.0):
            # the store failed moments ago: spool at once instead of stalling training on retries
            _spool_write(self.info.spool_dir, self.key, op)
            return False
        try:
            self.flush(raise_errors=True)
            _retry(lambda: _apply(self.client, self.run_id(), op))
            return True
        except Exception:
            _DOWN_UNTIL[self.info.uri] = time.monotonic() + 5.0
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


