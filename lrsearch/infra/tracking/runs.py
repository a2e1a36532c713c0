"""The search's MLflow runs: the parent run (driver) and one nested child run per trial (workers)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from lrsearch import __version__
from lrsearch.console import err
from lrsearch.errors import TrackingError
from lrsearch.infra.storage import filesystem, listing
from lrsearch.infra.tracking.store import (
    PARENT_KEY,
    PARENT_TAG,
    ROLE_TAG,
    SEARCH_TAG,
    SPOOL,
    TRIAL_TAG,
    TrackingInfo,
    _client,
    _metric,
    _RunLogger,
    _spool_count,
    _spool_keys,
    check_reachable,
    new_experiment,
    reachable,
    store_error,
)
from lrsearch.redact import redact_uri


class TrialLogger(_RunLogger):
    """The child run of one trial, nested under the search's parent run (used on Ray workers)."""

    def __init__(self, info: TrackingInfo, trial_id: str, trial_name: str | None = None) -> None:
        super().__init__(info, trial_id)
        self.trial_name = trial_name or trial_id

    def _find_or_create(self) -> str:
        # The trial's run id lives in a small file next to the results: found again in O(1) by a
        # retried or resumed trial and by the driver (a search of the store by tag scans every run
        # of the experiment: O(trials) per trial)
        fs, base = filesystem(_runs_dir(self.info))
        try:
            with fs.open_input_stream(f"{base}/{self.key}") as f:
                return f.read().decode().strip()
        except (FileNotFoundError, OSError):
            pass  # a new trial
        run = self.client.create_run(
            self.info.experiment_id,
            run_name=self.trial_name,
            tags={PARENT_TAG: self.info.parent_run_id, TRIAL_TAG: self.key,
                  SEARCH_TAG: self.info.search_id, ROLE_TAG: "trial"},
        )
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(f"{base}/{self.key}") as out:
            out.write(run.info.run_id.encode())
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

    def __init__(self, info: TrackingInfo, *, flush_timeout_s: float = 0.0) -> None:
        super().__init__(info, PARENT_KEY)
        self._run_id = info.parent_run_id
        self.flush_timeout_s = flush_timeout_s

    def _find_or_create(self) -> str:  # the parent run always exists before this object
        return self.info.parent_run_id

    @classmethod
    def start(cls, *, uri: str, experiment: str, job_name: str, results_dir: str,
              resume: bool, tags: dict[str, str] | None = None, flush_timeout_s: float = 0.0) -> SearchTracker:
        """Check the store, then create the parent run (or re-attach to it on ``--resume``).

        A new search (no ``resume``) whose results directory names the parent run of a search
        killed before it saved any trial closes that run as KILLED, so no parent stays RUNNING.
        ``flush_timeout_s``: how long :meth:`finish` keeps trying to log what the store missed.
        """
        tracker = cls._start(uri=uri, experiment=experiment, job_name=job_name, results_dir=results_dir,
                             resume=resume, tags=tags)
        tracker.flush_timeout_s = flush_timeout_s
        return tracker

    @classmethod
    def _start(cls, *, uri: str, experiment: str, job_name: str, results_dir: str,
               resume: bool, tags: dict[str, str] | None) -> SearchTracker:
        check_reachable(uri)
        client = _client(uri)
        shown = redact_uri(uri)  # what mlflow.json, tags and messages hold: never a credential
        state_file = Path(results_dir) / "mlflow.json" if "://" not in results_dir else None
        if not resume and state_file is not None and state_file.is_file():
            _close_dead_parent(client, json.loads(state_file.read_text()), shown)
        if resume and state_file is not None and state_file.is_file():
            saved = json.loads(state_file.read_text())
            if saved.get("uri") == shown:
                info = TrackingInfo.of(uri, saved["experiment_id"], saved["run_id"], saved["search_id"],
                                       f"{results_dir}/{SPOOL}")
                try:
                    client.update_run(info.parent_run_id, status="RUNNING")
                    client.set_tag(info.parent_run_id, "lrsearch.state", "running (resumed)")
                except Exception as exc:
                    raise TrackingError(f"--resume: parent run {info.parent_run_id} not found at {shown}: "
                                        f"{redact_uri(str(exc))}") from None
                saved.pop("ended", None)  # running again
                saved.pop("ended_logged", None)
                state_file.write_text(json.dumps(saved))
                return cls(info)
        try:
            return cls._create(client, uri, experiment, job_name, results_dir, state_file, tags)
        except Exception as exc:
            if getattr(exc, "error_code", None) == "PERMISSION_DENIED":  # an account that may only read
                raise store_error(exc, uri) from None
            raise

    @classmethod
    def _create(cls, client: Any, uri: str, experiment: str, job_name: str, results_dir: str,
                state_file: Path | None, tags: dict[str, str] | None) -> SearchTracker:
        exp = client.get_experiment_by_name(experiment)
        # experimentKind: MLflow's UI opens a training experiment on its runs table (nested runs
        # expandable), not on the GenAI overview
        experiment_id = exp.experiment_id if exp else new_experiment(
            client, uri, experiment, tags={"mlflow.experimentKind": "custom_model_development"})
        search_id = uuid.uuid4().hex[:12]
        all_tags = {ROLE_TAG: "search", SEARCH_TAG: search_id, "lrsearch.job": job_name,
                    "lrsearch.version": __version__, "lrsearch.results": results_dir}
        submission = os.environ.get("LRSEARCH_SUBMISSION_ID")  # set by lrsearch submit
        if submission:
            all_tags["ray.submission_id"] = submission
        all_tags.update(tags or {})
        run = client.create_run(experiment_id, run_name=f"{job_name}-{search_id[:6]}", tags=all_tags)
        info = TrackingInfo.of(uri, experiment_id, run.info.run_id, search_id, f"{results_dir}/{SPOOL}")
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({"uri": info.uri, "experiment_id": experiment_id,
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
        # A run whose trial id file names another run (its trial was retried where the file could
        # not be read) is closed the same way. One pass over the search's runs, page by page.
        mapped, token = _run_ids(self.info), None
        while True:
            try:
                runs = self.client.search_runs(
                    [self.info.experiment_id], max_results=1000, page_token=token,
                    filter_string=f"tags.`{SEARCH_TAG}` = '{self.info.search_id}' and tags.`{ROLE_TAG}` = 'trial'")
            except Exception:
                return  # the store is down: the trials' own logging is spooled, this tag can wait
            for run in runs:
                trial_id = run.data.tags.get(TRIAL_TAG)
                if trial_id not in trial_ids or mapped.get(trial_id, run.info.run_id) != run.info.run_id:
                    trial = TrialLogger(self.info, f"{trial_id}-{run.info.run_id[:8]}")
                    trial._run_id = run.info.run_id  # this run, whatever the file says
                    trial.log({"op": "batch", "tags": {"lrsearch.state": "abandoned (search interrupted)"}})
                    trial.log({"op": "terminate", "status": "KILLED"})
            token = runs.token
            if not token:
                return

    def interrupted(self) -> int:
        """Mark the parent run stopped by the user (``--resume`` sets it running again)."""
        return self._end("KILLED", "interrupted (resume with --resume)", wait=False)

    def finish(self, ok: bool = True) -> int:
        """Close the parent run and replay every spool; a store that is down is tried again for up to
        ``flush_timeout_s``. Returns the number of operations still pending (then logged by
        :func:`heal`, which the next ``lrsearch`` command on the job runs)."""
        return self._end("FINISHED" if ok else "FAILED", "finished" if ok else "failed", wait=True)

    def _end(self, status: str, label: str, *, wait: bool) -> int:
        # the end is recorded next to the results first: whatever the store misses of it (the
        # terminate operation spooled, or never sent when this process dies), heal() sets it later
        _save_state(self.info, ended=status, ended_logged=False)
        self.log({"op": "batch", "tags": {"lrsearch.state": label}})
        self.log({"op": "terminate", "status": status})
        pending = sync_spool(self.info)
        if pending and wait and self.flush_timeout_s > 0:
            pending = _wait_and_flush(self.info, pending, self.flush_timeout_s)
        if not pending:
            _save_state(self.info, ended_logged=True)
        return pending


def _runs_dir(info: TrackingInfo) -> str:
    return info.spool_dir.rsplit("/", 1)[0] + "/mlflow-runs"


def _run_ids(info: TrackingInfo) -> dict[str, str]:
    """``{trial id: MLflow run id}`` of the search's trial runs so far."""
    fs, base = filesystem(_runs_dir(info))
    ids = {}
    for name, path in listing(fs, base, dirs=False).items():
        with fs.open_input_stream(path) as f:
            ids[name] = f.read().decode().strip()
    return ids


def _close_dead_parent(client: Any, saved: dict[str, Any], uri: str) -> None:
    if saved.get("uri") != uri:
        return
    try:
        run = client.get_run(saved["run_id"])
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "lrsearch.state", "abandoned (killed; a new search replaced it)")
            client.set_terminated(run.info.run_id, "KILLED")
    except Exception:
        return  # deleted, or another store: nothing of ours to close


#: seconds between two tries of a store that is down, while a search's end waits for it
POLL_S = 3.0


def _wait_and_flush(info: TrackingInfo, pending: int, timeout_s: float) -> int:
    """Try the store every few seconds for up to ``timeout_s``; replay the spool once it answers.
    Ctrl+C stops waiting (what is pending stays for :func:`heal`)."""

    err.print(f"[yellow]note:[/] MLflow at {info.uri} is not reachable; {pending} logging operations "
              f"pending: trying again for up to {timeout_s:g} s (tracking.flush_timeout_s; Ctrl+C stops "
              "waiting)", highlight=False, soft_wrap=True)
    deadline = time.monotonic() + timeout_s
    try:
        while pending and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(POLL_S, left))
            if reachable(info.connect_uri()):
                pending = sync_spool(info)
    except KeyboardInterrupt:
        pass
    if pending:
        results = info.spool_dir.rsplit("/", 1)[0]
        err.print(f"[yellow]note:[/] {pending} logging operations still pending: the next lrsearch command on "
                  f"this job logs them (or: lrsearch sync {results})", highlight=False, soft_wrap=True)
    return pending


def _state_path(info_or_dir: TrackingInfo | str) -> Path | None:
    """The search's ``mlflow.json`` (``None`` on remote storage)."""
    results = info_or_dir if isinstance(info_or_dir, str) else info_or_dir.spool_dir.rsplit("/", 1)[0]
    return None if "://" in results else Path(results) / "mlflow.json"


def _save_state(info: TrackingInfo, **fields: Any) -> None:
    path = _state_path(info)
    if path is None or not path.is_file():
        return
    saved = json.loads(path.read_text())
    saved.update(fields)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(saved))
    os.replace(tmp, path)


def sync_spool(info: TrackingInfo) -> int:
    """Replay every spooled operation of a search; returns how many are still pending."""
    pending = 0
    for key in _spool_keys(info.spool_dir):
        logger = SearchTracker(info) if key == PARENT_KEY else TrialLogger(info, key)
        pending += logger.flush()
    return pending


def load_tracking_info(results_dir: str) -> TrackingInfo:
    """The tracking info a search saved in its results directory (for ``lrsearch sync``). The saved
    URI holds no credentials: a server that needs a login gets them from the environment."""
    state = Path(results_dir) / "mlflow.json"
    if not state.is_file():
        raise TrackingError(f"{results_dir}: no MLflow state (mlflow.json); was this a search's results directory?")
    saved = json.loads(state.read_text())
    return TrackingInfo(saved["uri"], saved["experiment_id"], saved["run_id"], saved["search_id"],
                        f"{results_dir}/{SPOOL}")


#: where a final run (``lrsearch train``) keeps its state, under the search's results directory
FINAL_STATE = "final/state.json"
_END_LABELS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "interrupted (resume with --resume)"}


def heal(results_dir: str | Path, *, uri: str | None = None) -> int:
    """Log into MLflow what it missed of the search in ``results_dir`` (and of its final run) while
    it was down: the spooled operations, in order, then the end (FINISHED, FAILED, KILLED) of a run
    the store still shows RUNNING. The ``lrsearch`` commands on a job run this first.

    Quiet, and without a call to the store, when nothing is pending; one line on stderr when it
    logs something, or when the store is still down (nothing is lost: the next call logs it).

    Args:
        results_dir: a search's results directory (``STORAGE/NAME``); one without a search's
            MLflow state (or on remote storage) has nothing to heal.
        uri: the job's tracking URI, credentials included (the saved one holds none).

    Returns:
        How many operations are still pending (0: all logged, or nothing was pending).

    Example:
        >>> heal("/nonexistent/results")
        0
    """

    results_dir = str(results_dir)
    state_file = _state_path(results_dir)
    if state_file is None or not state_file.is_file():
        return 0
    info = load_tracking_info(results_dir)
    if uri and redact_uri(uri) == info.uri:
        info = TrackingInfo.of(uri, info.experiment_id, info.parent_run_id, info.search_id, info.spool_dir)
    saved = json.loads(state_file.read_text())
    end = None if saved.get("ended_logged") else saved.get("ended")
    final_file = Path(results_dir) / FINAL_STATE
    final = json.loads(final_file.read_text()) if final_file.is_file() else {}
    final_end = None if final.get("ended_logged") or not final.get("run_id") else final.get("ended")
    spooled = _spool_count(info.spool_dir)
    if not (spooled or end or final_end):
        return 0
    if not reachable(info.connect_uri()):
        pending = spooled + bool(final_end) + bool(end and not spooled)  # a spooled end is one of spooled
        err.print(f"[yellow]note:[/] {pending} logging operations of the search in {results_dir} pending: "
                  f"MLflow at {info.uri} is not reachable; the next lrsearch command on this job logs them "
                  f"(or: lrsearch sync {results_dir})", highlight=False, soft_wrap=True)
        return pending
    left = sync_spool(info)
    n = spooled - left
    done = [f"logged {n} operation{'s' if n != 1 else ''} MLflow at {info.uri} missed while it was down"] \
        if n else []
    client = _client(info.connect_uri())
    if end and not left:
        closed = _close(client, info.parent_run_id, end)
        if closed is not None:
            _save_state(info, ended_logged=True)
        if closed:
            done.append(f"search run {info.parent_run_id} set {end}")
    if final_end:
        final_uri = info.connect_uri() if final.get("uri") in (None, info.uri) else final["uri"]
        closed = _close(_client(final_uri), final["run_id"], final_end)
        if closed is not None:
            final["ended_logged"] = True
            tmp = final_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(final, indent=1))
            os.replace(tmp, final_file)
        if closed:
            done.append(f"final run {final['run_id']} set {final_end}")
    if left:
        done.append(f"{left} still pending (lrsearch sync {results_dir})")
    if done:
        err.print(f"[yellow]note:[/] {'; '.join(done)}", highlight=False, soft_wrap=True)
    return left


def _close(client: Any, run_id: str, status: str) -> bool | None:
    """End ``run_id`` as ``status`` if the store still shows it RUNNING (its end was never logged):
    whether it did; ``None`` when the store did not answer (tried again next time)."""
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_tag(run_id, "lrsearch.state", _END_LABELS.get(status, status.lower()))
        client.set_terminated(run_id, status)
        return True
    except Exception:
        return None
