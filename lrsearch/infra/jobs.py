"""Submit searches to a Ray cluster through the Ray Jobs API. Only module using Ray's job client.

``submit`` ships the job file (and, for a ``python`` task, the user's task module) as the job's
``working_dir`` and runs ``lrsearch search JOB.yaml`` there. The submission id is derived from the
job's content, so submitting the same job twice attaches to the first submission instead of
starting a second search.

Token authentication stays on: the token is read from ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` and sent only as an HTTP header; it is never put in
the job's metadata, runtime environment, logs or MLflow. Neither are the MLflow credentials
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``): the cluster's
nodes have their own in their environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from lrsearch.errors import LRSearchError
from lrsearch.infra.cluster import search_entrypoint
from lrsearch.infra.tracking import heal
from lrsearch.job.config import JobConfig
from lrsearch.job.parse import load_job
from lrsearch.redact import redact_uri

__all__ = ["JobsError", "submission_id", "submit", "job_status", "job_logs", "stop_job", "list_jobs",
           "wait_for_job", "last_progress", "progress_text"]

#: Progress: a search's driver inside a Ray job writes a line ``lrsearch-progress {json}`` (a
#: :meth:`~lrsearch.tuning.budget.Ledger.snapshot`) to its logs at each trial's end; ``job_status``
#: and ``list_jobs`` read the last one, so they need nothing but the Jobs API.
PROGRESS_PREFIX = "lrsearch-progress "

TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (on the head node: `ray get-auth-token`), "
              "or point RAY_AUTH_TOKEN_PATH at a file holding it, or put it in ~/.ray/auth_token")


class JobsError(LRSearchError):
    """Raised when the Ray cluster cannot be reached, refuses the token, or has no such job."""


def _token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(path)] if path else [Path.home() / ".ray" / "auth_token"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text().strip() or None
    return None


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise JobsError(f"--address: got {address!r}; allowed: the dashboard URL, e.g. http://HEAD:8265")
    token = _token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # connection refused, 401/403, version mismatch
        raise _translate(exc, address, token) from None


def _translate(exc: Exception, address: str, token: str | None) -> JobsError:
    text = _scrub(str(exc), token)
    lowered = text.lower()
    if "401" in text or "authentication required" in lowered or "no authentication token" in lowered:
        return JobsError(f"{address}: the Ray cluster requires a token and none was sent; {TOKEN_HELP}")
    if "403" in text or "invalid or incorrect" in lowered or "authentication failed" in lowered:
        return JobsError(f"{address}: the Ray cluster rejected the token; {TOKEN_HELP}")
    if "not found" in lowered and "job" in lowered:
        return JobsError(f"{address}: {text.splitlines()[0]}")
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return JobsError(f"{address}: cannot reach the Ray Jobs API ({first}); is the head's dashboard up?")


def submission_id(job: JobConfig, job_text: str, command: list[str] | None = None) -> str:
    """``lrsearch-NAME-HASH`` (``lrsearch-train-NAME-HASH`` for a final run): the same job file
    content (and final-run options) gives the same id."""
    if command and command[0] == "train":
        digest = hashlib.sha256("\0".join([job_text, *command]).encode()).hexdigest()[:10]
        return f"lrsearch-train-{job.name}-{digest}"
    digest = hashlib.sha256(job_text.encode()).hexdigest()[:10]
    return f"lrsearch-{job.name}-{digest}"


def _stage(job_file: Path, job: JobConfig, staging: Path) -> None:
    """The working_dir of the Ray job: the job file, plus the task module of a python task."""
    shutil.copy2(job_file, staging / "job.yaml")
    if job.tracking.uri and redact_uri(job.tracking.uri) != job.tracking.uri:
        # credentials in tracking.uri stay here: the cluster's nodes log in with their own
        data = yaml.safe_load((staging / "job.yaml").read_text())
        data["tracking"]["uri"] = redact_uri(job.tracking.uri)
        (staging / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if job.task is None or job.task.kind != "python":
        return
    module = job.task.entrypoint.split(":", 1)[0].split(".", 1)[0]
    base = Path(job.resolve(job.task.path)) if job.task.path else job_file.parent
    package, single = base / module, base / f"{module}.py"
    if package.is_dir():
        shutil.copytree(package, staging / module, ignore=shutil.ignore_patterns("__pycache__"))
    elif single.is_file():
        shutil.copy2(single, staging / single.name)
        # the modules next to it that it may import (a train_fn's module importing the task's)
        for sibling in base.glob("*.py"):
            if not (staging / sibling.name).exists():
                shutil.copy2(sibling, staging / sibling.name)
    else:
        raise JobsError(f"task.entrypoint: module {module!r} not found next to the job file ({base}); "
                        "lrsearch submit ships it from there")
    if job.task.path:
        # the shipped job must find the module in its working_dir, not at the local path
        data = yaml.safe_load((staging / "job.yaml").read_text())
        data["task"]["path"] = "."
        (staging / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def submit(job_file: str | Path, address: str, *, extra_args: list[str] | None = None,
           command: str = "search") -> dict[str, Any]:
    """Submit ``lrsearch search JOB`` (or ``lrsearch train JOB``: ``command="train"``, the final run)
    to the cluster at ``address`` (the dashboard URL).

    Returns:
        ``{"submission_id", "status", "already_submitted", "dashboard", "experiment", "entrypoint"}``.
    """
    job_file = Path(job_file)
    job = load_job(job_file)  # a bad job fails here, before anything is sent
    text = job_file.read_text()
    if command not in ("search", "train"):
        raise JobsError(f"command: got {command!r}; allowed: search, train")
    sub_id = submission_id(job, text, [command, *(extra_args or [])] if command == "train" else None)
    client = _client(address)
    token = _token()
    experiment = job.tracking.experiment or job.name
    info: dict[str, Any] = {"submission_id": sub_id, "dashboard": f"{address.rstrip('/')}/#/jobs/{sub_id}",
                            "experiment": experiment,
                            "tracking_uri": redact_uri(job.tracking.uri) if job.tracking.uri else None}
    base_id, attempt = sub_id, 1
    while True:
        try:
            existing = client.get_job_info(sub_id)
        except Exception:
            existing = None
        if existing is None:
            break
        status = _status_text(existing.status)
        if status not in ("FAILED", "STOPPED"):
            # pending, running or succeeded: the same job is not started twice
            info.update(submission_id=sub_id, dashboard=f"{address.rstrip('/')}/#/jobs/{sub_id}",
                        status=status, already_submitted=True, entrypoint=existing.entrypoint)
            return info
        attempt += 1  # a failed or stopped submission may be tried again
        sub_id = f"{base_id}-{attempt}"
    _refuse_if_no_node_fits(address, job, token)
    info.update(submission_id=sub_id, dashboard=f"{address.rstrip('/')}/#/jobs/{sub_id}")
    argv = search_entrypoint("job.yaml")
    if command == "train":
        argv[1] = "train"
    entrypoint = " ".join([*argv, *(shlex.quote(a) for a in extra_args or [])])
    metadata = {"lrsearch.job": job.name, "lrsearch.experiment": experiment, "lrsearch.command": command}
    if "://" in job.storage.path or Path(job.storage.path).is_absolute():
        # the same place on the cluster as here: `jobs status` logs what MLflow missed of it
        metadata["lrsearch.results"] = job.results_dir()
    # Tags the MLflow parent run; not a secret. The tracking URI is the job's tracking.uri or the
    # cluster's own MLFLOW_TRACKING_URI: the submitter's (often a loopback address) is not forwarded,
    # nor are the submitter's MLflow credentials (the nodes log in with their own).
    env_vars = {"LRSEARCH_SUBMISSION_ID": sub_id}
    with tempfile.TemporaryDirectory(prefix="lrsearch-submit-") as tmp:
        _stage(job_file, job, Path(tmp))
        runtime_env: dict[str, Any] = {"working_dir": tmp, "env_vars": env_vars}
        # Right after a cluster starts, its Jobs API answers "No available agent to submit job,
        # please try again later" until the head's agent is up: wait for it (up to 5 minutes: a
        # busy head takes minutes)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.submit_job(entrypoint=entrypoint, submission_id=sub_id, runtime_env=runtime_env,
                                  metadata=metadata)
                break
            except Exception as exc:
                if "already exists" in str(exc):
                    # the same job submitted at the same moment from elsewhere won the race (Ray
                    # stores a submission id once): attach to it, as when it was there before
                    existing = client.get_job_info(sub_id)
                    info.update(status=_status_text(existing.status), already_submitted=True,
                                entrypoint=existing.entrypoint)
                    return info
                if "try again later" not in str(exc) or time.monotonic() > deadline:
                    raise _translate(exc, address, token) from None
                time.sleep(2)
    info.update(status="PENDING", already_submitted=False, entrypoint=entrypoint)
    return info


def _dashboard_get(address: str, path: str, token: str | None) -> Any:
    """``data`` of a dashboard REST answer (``None``: no answer; the caller then decides nothing)."""
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = requests.get(f"{address.rstrip('/')}{path}", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json().get("data")
    except Exception:
        return None


def _fixed_size(address: str, token: str | None) -> bool:
    """Whether nothing can add a node to the cluster: its monitor runs Ray's read-only provider (a
    cluster of hand-started ``ray start`` nodes names each node type ``node_<node id>``). A cluster
    launcher or KubeRay autoscaler names its own node types; no answer counts as "may grow"."""
    data = _dashboard_get(address, "/api/cluster_status", token) or {}
    report = (data.get("clusterStatus") or {}).get("autoscalerReport") or {}
    mapping = report.get("nodeTypeMapping") or {}
    return bool(mapping) and all(kind == f"node_{node}" for node, kind in mapping.items())


def _refuse_if_no_node_fits(address: str, job: JobConfig, token: str | None) -> None:
    """Refuse, before anything is sent, a job whose trial no node of the cluster can hold and no node
    can come for: one line naming the field, the value and the largest node's, instead of a job that
    fails inside (or waits ``resources.wait_for_node_s``). A job that asks to wait
    (``wait_for_node_s`` > 0), a cluster with an autoscaler and an unreadable node list all go
    through: the search checks again on the cluster (:func:`lrsearch.infra.ray_runtime.check_resources`).

    Raises:
        JobsError: ``resources.cpu`` / ``resources.gpu`` more than every node has.
    """
    r = job.resources
    if r.wait_for_node_s:
        return
    data = _dashboard_get(address, "/api/v0/nodes?detail=1&limit=10000", token)
    try:
        nodes = [n.get("resources_total") or {} for n in data["result"]["result"] if n.get("state") == "ALIVE"]
    except (KeyError, TypeError):
        return
    need = {"CPU": r.cpu, "GPU": r.gpu}
    fits = [all(n.get(k, 0.0) >= v for k, v in need.items() if v) for n in nodes]
    if not nodes or any(fits) or (r.wait_for_node_s is None and not _fixed_size(address, token)):
        return
    most = {k: max(n.get(k, 0.0) for n in nodes) for k in need}
    field, key = ("gpu", "GPU") if need["GPU"] > most["GPU"] else ("cpu", "CPU")
    if need[key] <= most[key]:  # each fits somewhere, never both on one node
        sizes = ", ".join(f"{n.get('CPU', 0):g} CPU + {n.get('GPU', 0):g} GPU" for n in nodes)
        raise JobsError(f"resources: got cpu {need['CPU']:g} and gpu {need['GPU']:g} per trial; no node of "
                        f"the Ray cluster at {address} has both (nodes: {sizes}); lower one of them; "
                        "nothing was submitted")
    raise JobsError(f"resources.{field}: got {need[key]:g} per trial; the largest node of the Ray cluster at "
                    f"{address} has {most[key]:g} {key}; allowed: at most {most[key]:g} (or add such a node; "
                    "to wait for an autoscaler to add one, set resources.wait_for_node_s); nothing was submitted")


def _status_text(status: Any) -> str:
    return str(status.value if hasattr(status, "value") else status)


def job_status(address: str, job_id: str) -> dict[str, Any]:
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise _translate(exc, address, _token()) from None
    status, metadata = _status_text(info.status), info.metadata or {}
    if status in ("SUCCEEDED", "FAILED", "STOPPED") and metadata.get("lrsearch.results"):
        heal(metadata["lrsearch.results"])  # what MLflow missed of the ended search, where it is readable here
    return {"submission_id": job_id, "status": status, "message": info.message,
            "entrypoint": info.entrypoint, "metadata": metadata,
            "start_time": info.start_time, "end_time": info.end_time,
            "progress": _progress(client, job_id, info.metadata)}


def job_logs(address: str, job_id: str) -> str:
    client = _client(address)
    try:
        return _scrub(client.get_job_logs(job_id), _token())
    except Exception as exc:
        raise _translate(exc, address, _token()) from None


def stop_job(address: str, job_id: str) -> bool:
    client = _client(address)
    try:
        return bool(client.stop_job(job_id))
    except Exception as exc:
        raise _translate(exc, address, _token()) from None


def list_jobs(address: str) -> list[dict[str, Any]]:
    client = _client(address)
    try:
        jobs = client.list_jobs()
    except Exception as exc:
        raise _translate(exc, address, _token()) from None
    return [{"submission_id": j.submission_id, "status": _status_text(j.status), "entrypoint": j.entrypoint,
             "job": (j.metadata or {}).get("lrsearch.job"), "progress": _progress(client, j.submission_id, j.metadata)}
            for j in jobs]


def _progress(client: Any, job_id: str, metadata: dict | None) -> dict[str, Any] | None:
    """The last progress line of a submitted search's logs (``None``: not a search, or none yet)."""
    metadata = metadata or {}
    if "lrsearch.job" not in metadata or metadata.get("lrsearch.command", "search") != "search":
        return None
    try:
        return last_progress(client.get_job_logs(job_id))
    except Exception:  # logs gone or unreadable: the status itself still answers
        return None


def last_progress(logs: str) -> dict[str, Any] | None:
    """The last complete ``lrsearch-progress`` line in ``logs``, parsed (``None``: none)."""
    for line in reversed(logs.splitlines()):
        if line.startswith(PROGRESS_PREFIX):
            try:
                return json.loads(line[len(PROGRESS_PREFIX):])
            except ValueError:  # cut short while being written
                continue
    return None


def progress_text(p: dict[str, Any], *, best: tuple[str, float | None] | None = None) -> str:
    """One line from a progress snapshot: trials, the best so far, the budget spent and left, the
    forecast end (``best``: another label and value, e.g. the live line's best epoch)."""
    label, value = best or ("best so far", p.get("best"))
    parts = [f"trials: {p['running']} running, {p['trials_done']}/{p['num_trials']} done",
             f"{label}: {p['metric']} {'-' if value is None else f'{value:.4f}'}"]
    b = p.get("budget")
    if b:
        parts.append(f"budget: {_amount(b['kind'], b['spent'])} of {_amount(b['kind'], b['limit'])} spent, "
                     f"{_amount(b['kind'], b['remaining'])} left")
    else:
        parts.append(f"spent: {_amount('trial_epochs', p['trial_epochs'])}")
    if p.get("forecast_end") and not p.get("finished"):
        parts.append(f"ends ~{datetime.fromisoformat(p['forecast_end']).astimezone():%Y-%m-%d %H:%M:%S}")
    return "; ".join(parts)


def _amount(kind: str, value: float) -> str:
    if kind == "trial_epochs":
        return f"{value:g} trial-epochs"
    if kind == "gpu_hours":
        return f"{value:.3g} GPU-hours"
    return f"{value:.0f} s"


def wait_for_job(address: str, job_id: str, on_log: Callable[[str], None] | None = None) -> str:
    """Stream the job's logs until it ends; returns the final status (SUCCEEDED, FAILED, STOPPED)."""
    import asyncio

    client = _client(address)
    token = _token()

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            if on_log is not None:
                on_log(_scrub(lines, token))

    try:
        asyncio.run(tail())
    except Exception as exc:
        raise _translate(exc, address, token) from None
    return _status_text(client.get_job_status(job_id))
