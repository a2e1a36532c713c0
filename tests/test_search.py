"""The search on a real local Ray, real Optuna TPE, real ASHA (the synthetic task keeps it fast)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from lrsearch.config import parse_job
from lrsearch.errors import LRSearchError
from lrsearch.search import run_search

REPO = Path(__file__).resolve().parent.parent
LRSEARCH = str(Path(sys.executable).with_name("lrsearch"))


def _job(tmp_path, **overrides):
    data = {
        "name": "synth",
        "task": {"kind": "synthetic", "num_train": 512, "num_val": 256, "batch_size": 64},
        "range_test": {"num_steps": 50, "end_lr": 10.0},
        "search": {"num_trials": 8, "max_epochs": 3, "grace_period": 1, "reduction_factor": 3,
                   "max_concurrent_trials": 2, "seed": 0},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns.db"},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_job(data)


def test_search_reports_pruned_trials_to_optuna_as_pruned(local_ray, tmp_path):
    job = _job(tmp_path)
    result = run_search(job, show_progress=False)
    trials = pq.read_table(result.paths["trials"]).to_pylist()
    assert len(trials) == 8 and result.counts["total"] == 8
    assert result.counts["completed"] >= 1 and result.counts["pruned"] >= 1  # ASHA really stopped some
    # the range test's bounds fed the space, and its suggestion was the first trial
    low, high = result.range_test["bounds"]
    assert all(low <= t["max_lr"] <= high for t in trials)
    study = json.loads(Path(result.paths["optuna_trials"]).read_text())
    assert len(study) == 8
    assert study[0]["params"]["schedule"] == "linear"  # the default space's default schedule
    by_config = {json.dumps(dict(sorted(s["params"].items()))): s for s in study}
    for t in trials:
        config = json.loads(t["config"])
        flat = {"max_lr": config["max_lr"], "schedule": config["schedule"]}
        flat.update({f"{config['schedule']}/{k}": v for k, v in config.get(config["schedule"], {}).items()})
        s = by_config[json.dumps(dict(sorted(flat.items())))]
        if t["state"] == "completed":
            assert s["state"] == "COMPLETE" and s["value"] == pytest.approx(t["final_metric"])
            assert t["stopped_at_epoch"] == 3
        else:
            # stopped early by ASHA: PRUNED, not COMPLETE with a partial value
            assert t["state"] == "pruned" and t["stopped_at_epoch"] < 3
            assert s["state"] == "PRUNED"
            assert s["user_attrs"]["stopped_at"] == t["stopped_at_epoch"]
            # its value at the rung it was stopped on is an intermediate value, as TPE expects
            assert s["intermediate"][str(t["stopped_at_epoch"])] == pytest.approx(t["final_metric"])
    # best config: the best completed trial, written as YAML that rebuilds its schedule
    best = yaml.safe_load(Path(result.paths["best_config"]).read_text())
    completed = [t for t in trials if t["state"] == "completed"]
    assert best["value"] == max(t["final_metric"] for t in completed)
    assert best["schedule"] in {t["schedule"] for t in completed}
    assert all(len(t["metric_per_epoch"]) == t["stopped_at_epoch"] for t in trials)
    # once finished, only the best trial keeps its checkpoint (keep_checkpoints: best)
    kept = {p.parent.name for p in Path(result.paths["ray_results"]).glob("*/checkpoint_*")}
    assert len(kept) == 1 and best["trial_id"] in kept.pop()
    summary = json.loads(Path(result.paths["summary"]).read_text())
    assert summary["counts"] == result.counts and summary["best_metric"] == best["value"]


def test_diverging_trials_stop_at_once_and_the_search_goes_on(local_ray, tmp_path):
    # max_lr far beyond the diverged region: every trial explodes, none crashes the search
    job = _job(tmp_path, name="diverge", range_test={"enabled": False},
               space={"max_lr": {"low": 50.0, "high": 500.0, "log": True}, "schedules": ["constant"]},
               search={"num_trials": 3, "max_epochs": 3})
    result = run_search(job, show_progress=False)
    assert result.counts["diverged"] == 3 and result.counts["errored"] == 0
    assert result.best_config is None
    trials = pq.read_table(result.paths["trials"]).to_pylist()
    assert all(t["stopped_at_epoch"] == 1 for t in trials)  # stopped in the first epoch
    study = json.loads(Path(result.paths["optuna_trials"]).read_text())
    assert [s["state"] for s in study] == ["PRUNED"] * 3
    assert all(s["user_attrs"]["diverged"] is True for s in study)


def test_existing_results_are_never_overwritten(local_ray, tmp_path):
    job = _job(tmp_path, name="twice", search={"num_trials": 1, "max_epochs": 1, "grace_period": 1})
    run_search(job, show_progress=False)
    with pytest.raises(LRSearchError, match="--resume"):
        run_search(job, show_progress=False)
    with pytest.raises(LRSearchError, match="no interrupted search"):
        run_search(_job(tmp_path, name="never-ran"), resume=True, show_progress=False)


def test_resume_after_the_driver_is_killed(tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({
        "name": "killed",
        "task": {"kind": "synthetic", "num_train": 4096, "num_val": 256, "batch_size": 32, "hidden": 256},
        "range_test": {"num_steps": 30},
        "search": {"num_trials": 6, "max_epochs": 2, "grace_period": 2, "max_concurrent_trials": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlruns.db", "experiment": "killed-exp"},
    }))
    out = tmp_path / "runs" / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([LRSEARCH, "search", str(job_file), "--json"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # wait until at least two trials have finished, then kill the driver and its local Ray
    study_file = out / "optuna_trials.json"
    deadline = time.time() + 240
    finished_before = []
    while time.time() < deadline and proc.poll() is None:
        if study_file.is_file():
            try:
                finished_before = [s for s in json.loads(study_file.read_text()) if s["state"] != "RUNNING"]
            except json.JSONDecodeError:
                finished_before = []
            if len(finished_before) >= 2:
                break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert len(finished_before) >= 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()  # it really was interrupted

    done = subprocess.run([LRSEARCH, "search", str(job_file), "--resume", "--json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["counts"]["total"] == 6
    assert summary["counts"]["errored"] == 0
    study = json.loads(study_file.read_text())
    finished = [s for s in study if s["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6  # the requested count, not more
    # the trials finished before the kill were kept, not re-run: same params, same values
    for before in finished_before:
        match = [s for s in study if s["params"] == before["params"]]
        assert len(match) == 1 and match[0]["value"] == before["value"]
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 6 and all(t["state"] == "completed" for t in trials)
    # MLflow: the resumed search re-attached to its parent run; one child run per trial, no duplicates
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name("killed-exp")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lrsearch.role") == "search"]
    children = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == summary["tracking"]["run_id"]
    kept = [r for r in children if r.data.tags.get("lrsearch.state") != "abandoned (search interrupted)"]
    # one child run per trial of the search; a trial that had started but that Ray Tune had not yet
    # recorded when the driver died is not resumed (Tune starts another): its run is marked abandoned
    assert sorted(r.data.tags["lrsearch.trial_id"] for r in kept) == sorted(t["trial_id"] for t in trials)
    assert len(children) - len(kept) <= 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
