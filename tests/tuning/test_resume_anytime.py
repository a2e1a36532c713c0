"""Fault injection: the driver killed alone (SIGKILL to its process only, as the OOM killer does)
at several moments: before it saved anything, during the range test, and between trials. After
each kill, `lrsearch search --resume` continues; at the end the search holds all its trials, none
errored, one MLflow parent run, and no run left RUNNING. The drivers join the session's local Ray
(``conftest.joined``), which ends the trials a killed driver owned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from conftest import joined, mlflow_uri
from mlflow import MlflowClient

LRSEARCH = str(Path(sys.executable).with_name("lrsearch"))
NUM_TRIALS = 3


def _job_file(tmp_path: Path, name: str) -> Path:
    job_file = tmp_path / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump({
        "name": name,
        # a range test of ~7 s here: long enough to be killed in the middle of it
        "task": {"kind": "synthetic", "num_train": 4096, "num_val": 256, "batch_size": 256, "hidden": 2048,
                 "num_features": 256},
        "range_test": {"num_steps": 200, "end_lr": 1.0},
        # the trials, though, as short as they can be: 4 steps an epoch
        "search": {"num_trials": NUM_TRIALS, "max_epochs": 2, "grace_period": 2, "max_concurrent_trials": 1,
                   "max_steps_per_epoch": 4},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_uri(tmp_path), "experiment": name},
    }))
    return job_file


def _start(job_file: Path, *args: str) -> subprocess.Popen:
    # a session of its own, so the test can clean up whatever the killed driver leaves behind
    return subprocess.Popen([LRSEARCH, "search", str(job_file), "--json", *args], cwd=job_file.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**joined(), "PYTHONUNBUFFERED": "1"})


def _kill_driver_when(proc: subprocess.Popen, ready, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before {what}: " + proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, f"never reached {what}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer does
    proc.wait()


def _reap(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything else left in the killed driver's session
    except ProcessLookupError:
        pass


def _finished_trials(out: Path) -> int:
    # Opens the study as optuna-dashboard would, every 50 ms from the moment the file appears: it
    # races the driver's own creation of the storage, which must survive that.
    if not (out / "optuna.db").is_file():
        return 0
    import optuna

    try:
        study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'optuna.db'}")
        return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    except Exception:
        return 0


def test_kill_at_any_moment_then_resume_finishes_the_search(tmp_path):
    name = "anytime"
    job_file, out = _job_file(tmp_path, name), tmp_path / "runs" / name
    procs = []

    def moment(ready, what, *args):
        proc = _start(job_file, *args)
        procs.append(proc)
        try:
            _kill_driver_when(proc, ready, what)
        finally:
            _reap(proc)
        assert not (out / "summary.json").exists()

    try:
        # 1. as it starts: the results directory exists, nothing is saved in it yet
        moment(lambda: out.is_dir(), "the results directory")
        assert not (out / "mlflow.json").exists()
        # 2. during the range test: the MLflow parent run exists, the range test is not saved yet
        moment(lambda: (out / "mlflow.json").is_file(), "the range test", "--resume")
        assert not (out / "range_test.json").exists()
        # 3. between trials: the range test is saved and one trial has finished
        moment(lambda: _finished_trials(out) >= 1, "the first finished trial", "--resume")
        saved_range_test = (out / "range_test.json").read_text()
        done = _start(job_file, "--resume")
        procs.append(done)
        text = done.communicate(timeout=600)[0].decode()
    finally:
        for proc in procs:
            _reap(proc)
    assert done.returncode == 0, text[-3000:]
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["counts"]["total"] == NUM_TRIALS and summary["counts"]["errored"] == 0
    assert (out / "range_test.json").read_text() == saved_range_test  # reused, not run again
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == NUM_TRIALS and {t["state"] for t in trials} <= {"completed", "diverged"}
    assert any(t["state"] == "completed" for t in trials)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parents = [r for r in runs if r.data.tags.get("lrsearch.role") == "search"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # one parent across 4 drivers
    assert parents[0].info.run_id == summary["tracking"]["run_id"]
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    children = {r.data.tags["lrsearch.trial_id"]: r for r in runs if r.data.tags.get("lrsearch.role") == "trial"}
    for t in trials:  # every trial of the table has its child run, finished, each epoch logged once
        child = children[t["trial_id"]]
        assert child.info.status == ("FINISHED" if t["state"] == "completed" else "FAILED")
        if t["state"] == "completed":
            history = client.get_metric_history(child.info.run_id, "val_accuracy")
            assert sorted(m.step for m in history) == [1, 2]


def test_a_rerun_without_resume_closes_the_killed_searchs_parent_run(tmp_path):
    name = "rerun"
    job_file, out = _job_file(tmp_path, name), tmp_path / "runs" / name
    first = _start(job_file)
    try:
        _kill_driver_when(first, lambda: (out / "mlflow.json").is_file(), "the range test")
    finally:
        _reap(first)
    killed_parent = json.loads((out / "mlflow.json").read_text())["run_id"]
    # nothing of Ray Tune's was saved: running the job again starts a new search
    again = subprocess.run([LRSEARCH, "search", str(job_file), "--json", "--num-trials", "1"],
                           cwd=tmp_path, env=joined(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    old = client.get_run(killed_parent)
    assert old.info.status == "KILLED" and old.data.tags["lrsearch.state"].startswith("abandoned")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
