"""Checks every training loop on the trial protocol must pass (the built-in one, a train_fn, the
HF Trainer, Lightning): each trial's LR at every optimizer step, as logged to MLflow, is the
schedule's (``lrsearch.optim.schedules``), ASHA stopped trials, and a killed search resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import joined
from mlflow import MlflowClient

from lrsearch.optim.schedules import lr_curve
from lrsearch.output.results import TrialState


def logged_lrs(uri: str, result, experiment: str | None = None) -> dict[str, list[float]]:
    """Each trial's LR at every optimizer step, from its MLflow run (``lr_step``)."""
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id if experiment else result.tracking["experiment_id"]
    runs = client.search_runs([exp_id], max_results=1000)
    out = {}
    for run in runs:
        if run.data.tags.get("lrsearch.role") == "trial":
            history = sorted(client.get_metric_history(run.info.run_id, "lr_step"), key=lambda m: m.step)
            out[run.data.tags["lrsearch.trial_id"]] = [m.value for m in history]
    return out


def assert_schedules(uri: str, result, steps_per_epoch: int, experiment: str | None = None) -> None:
    """Every trial trained ``steps_per_epoch`` steps per epoch it ran, each at its schedule's LR."""
    lrs = logged_lrs(uri, result, experiment)
    total = steps_per_epoch * result.best.search_horizon["epochs"]
    checked = 0
    for t in result.trials:
        if t.state is TrialState.ERRORED:
            continue
        got = lrs[t.trial_id]
        assert len(got) == steps_per_epoch * t.stopped_at_epoch, (t.trial_id, len(got))
        want = lr_curve(t.schedule, total, t.max_lr, **t.schedule_params)[:len(got)]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), t.schedule
        checked += 1
    assert checked == len(result.trials)


def assert_asha_stopped_some(result) -> None:
    states = [t.state for t in result.trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETED in states, states
    assert all(t.stopped_at_epoch < result.best.search_horizon["epochs"] for t in result.trials
               if t.state is TrialState.PRUNED)


def run_script(script: Path, *args: str) -> subprocess.Popen:
    """The driver script in a session of its own; Tune saves its state every second (not every
    10 s), so that a kill finds the checkpoints in it."""
    return subprocess.Popen([sys.executable, str(script), *args], cwd=script.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**joined(), "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"})


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL the driver alone once ``ready()``; then anything else left in its session."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"finished before {what}: " + proc.stdout.read().decode()[-3000:])
        assert time.time() < deadline, f"never reached {what}"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tune_saved(tune_dir: Path, trial: int, checkpoint: str) -> bool:
    """Whether Tune's saved experiment state already holds the ``trial``-th trial (from 1) at
    ``checkpoint`` or later. A checkpoint on disk is not enough to kill on: Tune resumes a trial from
    the checkpoint its saved state names, which can lag the disk by a save period, so the test
    would resume from an earlier point (or anew) than the one it means to test. The trial must not
    be saved as ended either: a resume does not rerun a terminated trial, so there is nothing left to
    test (its last epochs can outrun the kill on a loaded machine)."""
    for state in tune_dir.glob("experiment_state-*.json") if tune_dir.is_dir() else []:
        try:
            trials = json.loads(state.read_text())["trial_data"]
            for saved, runtime in trials:
                last = json.loads(runtime).get("last_result") or {}
                if (str(last.get("experiment_tag", "")).split("_")[0] == str(trial)
                        and json.loads(saved).get("status") not in ("TERMINATED", "ERROR")
                        and (last.get("checkpoint_dir_name") or "") >= checkpoint):
                    return True
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written: read it again on the next poll
    return False


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode()
    assert proc.returncode == 0, text[-4000:]
    return text
