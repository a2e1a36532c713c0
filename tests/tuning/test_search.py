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
from conftest import joined, mlflow_uri

from lrsearch.errors import LRSearchError
from lrsearch.job.parse import parse_job
from lrsearch.tuning import run_search

REPO = Path(__file__).resolve().parents[2]
LRSEARCH = str(Path(sys.executable).with_name("lrsearch"))


def _job(tmp_path, **overrides):
    data = {
        "name": "synth",
        "task": {"kind": "synthetic", "num_train": 512, "num_val": 256, "batch_size": 64},
        "range_test": {"num_steps": 50, "end_lr": 10.0},
        "search": {"num_trials": 8, "max_epochs": 3, "grace_period": 1, "reduction_factor": 3,
                   "max_concurrent_trials": 2, "seed": 0},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_uri(tmp_path)},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_job(data)


def test_search_reports_pruned_trials_to_optuna_as_pruned(local_ray, tmp_path):
    # one trial at a time, so that ASHA's stops follow from the results, not from a loaded CPU's timing
    job = _job(tmp_path, search={"max_concurrent_trials": 1})
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


def test_a_trial_keeps_only_its_newest_checkpoint_while_the_search_runs(local_ray, tmp_path):
    # a checkpoint after every epoch, all kept once finished: each trial must hold only its last one,
    # the earlier ones deleted as the next was saved
    job = _job(tmp_path, name="ckpts", range_test={"enabled": False},
               search={"num_trials": 3, "max_epochs": 3, "early_stopping": "none",
                       "checkpoint": "epoch", "keep_checkpoints": "all"})
    result = run_search(job, show_progress=False, track=False)
    assert result.counts["completed"] == 3
    for trial in result.trials:
        kept = sorted(p.name for p in Path(trial.path).glob("checkpoint_*"))
        assert kept == ["checkpoint_000002"], (trial.trial_id, kept)  # epoch 3's, the third saved


def test_diverging_trials_stop_at_once_and_the_search_goes_on(local_ray, tmp_path):
    # max_lr far beyond the diverged region: every trial explodes, none crashes the search
    job = _job(tmp_path, name="diverge", range_test={"enabled": False},
               space={"max_lr": {"low": 50.0, "high": 500.0, "log": True}, "schedules": ["constant"]},
               search={"num_trials": 3, "max_epochs": 3})
    result = run_search(job, show_progress=False)
    assert result.counts["diverged"] == 3 and result.counts["errored"] == 0
    assert result.best is None
    trials = pq.read_table(result.paths["trials"]).to_pylist()
    assert all(t["stopped_at_epoch"] == 1 for t in trials)  # stopped in the first epoch
    study = json.loads(Path(result.paths["optuna_trials"]).read_text())
    assert [s["state"] for s in study] == ["PRUNED"] * 3
    assert all(s["user_attrs"]["diverged"] is True for s in study)


def test_a_time_budget_ends_the_search_with_results_not_as_an_interruption(local_ray, tmp_path):
    # Tune stops the running trial at the budget, as it does on Ctrl+C: this is still a finished search
    job = _job(tmp_path, name="budget", search={"num_trials": 100, "max_epochs": 40, "grace_period": 40,
                                                "max_concurrent_trials": 1, "time_budget_s": 12})
    result = run_search(job, show_progress=False)
    assert 1 <= result.counts["total"] < 100
    assert Path(result.paths["trials"]).is_file()
    assert json.loads((Path(job.results_dir()) / "summary.json").read_text())["counts"] == result.counts


def test_existing_results_are_never_overwritten(local_ray, tmp_path):
    job = _job(tmp_path, name="twice", search={"num_trials": 1, "max_epochs": 1, "grace_period": 1})
    run_search(job, show_progress=False)
    with pytest.raises(LRSearchError, match="--resume"):
        run_search(job, show_progress=False)



def test_resume_with_nothing_saved_starts_afresh_and_says_so(local_ray, tmp_path):
    # a driver killed before anything was saved: --resume is still the command that continues
    result = run_search(_job(tmp_path, name="never-ran", search={"num_trials": 2, "max_epochs": 1}),
                        resume=True, show_progress=False)
    assert result.counts["total"] == 2
    assert len(result.notes) == 1 and "starting the trials from the beginning" in result.notes[0]


def _interruptible_job(tmp_path, name: str, num_train: int, **search) -> tuple[Path, Path]:
    """A job file of one-at-a-time synthetic trials for the kill / Ctrl+C tests; its results dir."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({
        "name": name,
        "task": {"kind": "synthetic", "num_train": num_train, "num_val": 256, "batch_size": 32, "hidden": 256},
        "range_test": {"num_steps": 30},
        "search": {**search, "max_concurrent_trials": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_uri(tmp_path), "experiment": f"{name}-exp"},
    }))
    return job_file, tmp_path / "runs" / name


def test_resume_after_the_driver_is_killed(tmp_path):
    job_file, out = _interruptible_job(tmp_path, "killed", 4096, num_trials=6, max_epochs=2, grace_period=2)
    env = {**joined(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([LRSEARCH, "search", str(job_file), "--json"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # wait until at least two trials have finished (in the study's own storage), then kill the
    # driver (it joined the session's Ray, which ends the trials it owned)
    study_file = out / "optuna_trials.json"
    deadline = time.time() + 240
    finished_before = []
    while time.time() < deadline and proc.poll() is None:
        finished_before = _finished_in_study(out / "optuna.db", "killed")
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
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert summary["counts"]["errored"] == 0, [t["error"] for t in trials if t["error"]]
    study = json.loads(study_file.read_text())
    finished = [s for s in study if s["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6  # the requested count, not more
    # the trials finished before the kill were kept, not re-run: same params, same values
    for before in finished_before:
        match = [s for s in study if s["params"] == before["params"]]
        assert len(match) == 1 and match[0]["value"] == before["value"]
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


def _finished_in_study(db: Path, name: str) -> list[dict]:
    """The study's finished trials, read from its SQLite storage while the search runs."""
    import optuna

    if not db.is_file():
        return []
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    except Exception:  # the storage is still being created
        return []
    return [{"params": t.params, "value": t.value} for t in study.get_trials(deepcopy=False)
            if t.state.is_finished()]


def test_resume_fills_each_replaced_checkpoint_with_a_replay(tmp_path):
    from lrsearch.tuning.checkpoints import fill_replaced_checkpoints as _fill_replaced_checkpoints

    tune_dir = tmp_path / "tune"
    (tune_dir / "trial_a" / "checkpoint_000002").mkdir(parents=True)  # 0 and 1 replaced by 2
    (tune_dir / "trial_a" / "checkpoint_000002" / "trial.pt").write_bytes(b"state")
    (tune_dir / "trial_b" / "checkpoint_000000").mkdir(parents=True)  # nothing replaced
    (tune_dir / "trial_c").mkdir()  # no checkpoint yet
    _fill_replaced_checkpoints(str(tune_dir), [1, 2, 3])
    a = tune_dir / "trial_a"
    assert sorted(p.name for p in a.iterdir()) == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
    assert json.loads((a / "checkpoint_000000" / "replay.json").read_text()) == {"epoch": 1}
    assert json.loads((a / "checkpoint_000001" / "replay.json").read_text()) == {"epoch": 2}
    assert (a / "checkpoint_000002" / "trial.pt").read_bytes() == b"state"  # the real one untouched
    assert [p.name for p in (tune_dir / "trial_b").iterdir()] == ["checkpoint_000000"]
    assert list((tune_dir / "trial_c").iterdir()) == []


def test_ctrl_c_keeps_the_search_and_resume_replays_a_replaced_checkpoint(tmp_path):
    """Ctrl+C stops cleanly (exit 130, nothing final written); a resume whose saved state names a
    checkpoint Tune had already replaced (ray-project/ray#27790) retrains those epochs instead of
    failing the trial, and logs no epoch twice."""
    job_file, out = _interruptible_job(tmp_path, "ctrlc", 8192, num_trials=3, max_epochs=4, grace_period=4,
                                       checkpoint="epoch")
    env = {**joined(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([LRSEARCH, "search", str(job_file)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(out.glob("tune/*/checkpoint_000000")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C in a terminal sends
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text[-3000:]
    assert f"continue it with: lrsearch search {job_file} --resume" in text
    assert "Traceback" not in text
    assert not (out / "summary.json").exists() and not (out / "trials.parquet").exists()
    (trial_dir,) = [d for d in (out / "tune").iterdir() if list(d.glob("checkpoint_*"))]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name("ctrlc-exp")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`lrsearch.role` = 'search'")
    assert parent.info.status == "KILLED" and parent.data.tags["lrsearch.state"].startswith("interrupted")

    # what a driver killed between Tune deleting a checkpoint and saving its state leaves: the
    # checkpoint the state names is gone, a newer one is there
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    newest = int(checkpoints[-1].name[11:])
    checkpoints[-1].rename(trial_dir / f"checkpoint_{newest + 1:06d}")
    for c in checkpoints[:-1]:
        c.rename(tmp_path / c.name)

    done = subprocess.run([LRSEARCH, "search", str(job_file), "--resume", "--json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 3 and [t["error"] for t in trials] == [None] * 3
    replayed = next(t for t in trials if t["path"].endswith(trial_dir.name))
    assert replayed["state"] == "completed" and len(replayed["metric_per_epoch"]) == 4
    (parent,) = client.search_runs([exp.experiment_id], "tags.`lrsearch.role` = 'search'")
    assert parent.info.status == "FINISHED" and parent.data.tags["lrsearch.state"] == "finished"
    (child,) = client.search_runs([exp.experiment_id], f"tags.`lrsearch.trial_id` = '{replayed['trial_id']}'")
    history = client.get_metric_history(child.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # the replayed epochs were not logged again
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(replayed["metric_per_epoch"])
