"""A real multi-node Ray cluster on 127.0.0.1 with token authentication: `lrsearch submit`, jobs
commands, and a worker node killed mid-search.

The head (no CPUs for trials, dashboard + Jobs API on 127.0.0.1) and two worker nodes are started
with exactly the commands of ``lrsearch.infra.cluster`` (the same ones docker/compose.yaml runs), and
every process the test started is stopped by its id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, kill_group, loopback_cluster, mlflow_uri
from mlflow import MlflowClient
from typer.testing import CliRunner

from lrsearch.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with loopback_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def _job_file(cluster, name, **search):
    tmp = cluster["tmp"]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "task": {"kind": "synthetic", "num_train": 2048, "num_val": 256, "batch_size": 64, "hidden": 128},
        "range_test": {"num_steps": 30},
        "search": {"num_trials": 4, "max_epochs": 2, "grace_period": 2, "max_concurrent_trials": 2,
                   "max_failures": 3, **search},
        "resources": {"cpu": 1},
        # one filesystem for all nodes here; on a real cluster: s3://... or a shared mount
        "storage": {"path": str(tmp / "runs")},
        "tracking": {"uri": mlflow_uri(tmp), "experiment": name},
    }))
    return path


def _cli(cluster, *args, token="use"):
    env = {"RAY_AUTH_TOKEN": cluster["token"] if token == "use" else token, "HOME": str(cluster["tmp"])}
    return runner.invoke(app, [*args], env=env)


def test_submit_runs_the_search_across_nodes(cluster):
    job = _job_file(cluster, "multi")
    result = _cli(cluster, "submit", str(job), "--address", cluster["address"], "--wait", "--json")
    assert result.exit_code == 0, result.output[-4000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["status"] == "SUCCEEDED" and info["submission_id"].startswith("lrsearch-multi-")

    out = cluster["tmp"] / "runs" / "multi"
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 4 and all(t["state"] in ("completed", "pruned") for t in trials)
    assert len({t["node_id"] for t in trials}) >= 2  # trials really ran on more than one node
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["total"] == 4 and summary["best_config"] is not None

    client = MlflowClient(f"sqlite:///{cluster['tmp']}/mlruns.db")
    exp = client.get_experiment_by_name("multi")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("lrsearch.role") == "search")
    children = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
    assert len(children) == 4
    assert parent.data.tags["ray.submission_id"] == info["submission_id"]

    # the token is nowhere: job metadata, entrypoint, logs, MLflow
    status = _cli(cluster, "jobs", "status", info["submission_id"], "--address", cluster["address"], "--json")
    assert status.exit_code == 0
    logs = _cli(cluster, "jobs", "logs", info["submission_id"], "--address", cluster["address"])
    assert logs.exit_code == 0 and "lrsearch search" in logs.output
    everything = status.output + logs.output + json.dumps([r.data.params | r.data.tags for r in runs])
    assert cluster["token"] not in everything

    # submitting the same job again does not start a second search
    again = _cli(cluster, "submit", str(job), "--address", cluster["address"], "--json")
    assert again.exit_code == 0
    second = json.loads(again.stdout)
    assert second["already_submitted"] is True and second["submission_id"] == info["submission_id"]
    listed = json.loads(_cli(cluster, "jobs", "list", "--address", cluster["address"], "--json").stdout)
    assert sum(1 for j in listed["jobs"] if j["job"] == "multi") == 1

    # its final run, submitted the same way: trained on a worker node, nested under the search
    final = _cli(cluster, "submit", str(job), "--address", cluster["address"], "--train", "--epochs", "3",
                 "--wait", "--json")
    assert final.exit_code == 0, final.output[-4000:]
    trained = json.loads(final.stdout.strip().splitlines()[-1])
    assert trained["status"] == "SUCCEEDED" and trained["submission_id"].startswith("lrsearch-train-multi-")
    assert trained["entrypoint"] == "lrsearch train job.yaml --epochs 3"
    finals = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("lrsearch.role") == "final"]
    assert len(finals) == 1 and finals[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert finals[0].info.status == "FINISHED" and "test_accuracy" in finals[0].data.metrics
    assert finals[0].data.params["epochs"] == "3"


def test_jobs_status_and_list_show_a_submitted_searchs_progress_and_budget(cluster):
    job = _job_file(cluster, "progress", num_trials=6, max_epochs=2, grace_period=1, budget={"trial_epochs": 5})
    sub = _cli(cluster, "submit", str(job), "--address", cluster["address"], "--wait", "--json")
    assert sub.exit_code == 0, sub.output[-4000:]
    sub_id = json.loads(sub.stdout.strip().splitlines()[-1])["submission_id"]
    summary = json.loads((cluster["tmp"] / "runs" / "progress" / "summary.json").read_text())
    assert summary["budget"]["spent"] == 5 and summary["counts"]["total"] < 6  # the budget stopped it

    # read through the Jobs API only: the driver's last progress line in the job's logs
    status = _cli(cluster, "jobs", "status", sub_id, "--address", cluster["address"], "--json")
    assert status.exit_code == 0, status.output
    progress = json.loads(status.stdout)["progress"]
    assert progress["trials_done"] == summary["counts"]["total"] and progress["num_trials"] == 6
    assert progress["best"] == summary["best_metric"] and progress["trial_epochs"] == 5
    assert progress["budget"] == {"kind": "trial_epochs", "limit": 5, "spent": 5, "remaining": 0, "exhausted": True}
    text = _cli(cluster, "jobs", "status", sub_id, "--address", cluster["address"])
    line = " ".join(text.output.split())  # the console wraps at the terminal's width
    assert "SUCCEEDED" in line and f"{progress['trials_done']}/6 done" in line
    assert "5 trial-epochs of 5 trial-epochs spent" in line
    listed = json.loads(_cli(cluster, "jobs", "list", "--address", cluster["address"], "--json").stdout)
    (row,) = [j for j in listed["jobs"] if j["submission_id"] == sub_id]
    assert row["progress"] == progress


def test_search_joins_an_existing_cluster_with_address(cluster):
    # the driver runs here and joins the running cluster instead of starting a local Ray
    job = _job_file(cluster, "joined", num_trials=2, max_epochs=1, grace_period=1)
    env = cluster["env"]
    done = subprocess.run([str(BIN / "lrsearch"), "search", str(job), "--address", cluster["gcs"], "--json"],
                          env=env, capture_output=True, text=True, timeout=400, cwd=cluster["tmp"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["counts"]["total"] == 2 and summary["counts"]["errored"] == 0
    trials = pq.read_table(summary["paths"]["trials"]).to_pylist()
    head_id = _head_node_id(cluster)
    assert all(t["node_id"] and t["node_id"] != head_id for t in trials)  # on the workers: head has 0 CPUs


def _head_node_id(cluster) -> str:
    code = (f"import ray; ray.init(address='{cluster['gcs']}', log_to_driver=False); "
            "print([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU', 0) == 0][0])")
    out = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("token", "fragment"), [(None, "none was sent"), ("wrong-token", "rejected the token")])
def test_missing_or_wrong_token_is_one_clear_line(cluster, token, fragment):
    # a fresh process, as a user runs it (Ray caches a token it has loaded once per process)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(cluster["tmp"] / "nohome")  # no ~/.ray/auth_token either
    if token:
        env["RAY_AUTH_TOKEN"] = token
    result = subprocess.run([str(BIN / "lrsearch"), "jobs", "list", "--address", cluster["address"]],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert fragment in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_worker_node_killed_mid_search(cluster):
    # a checkpoint every epoch: the kill comes while trials are between epochs
    job = _job_file(cluster, "survivor", num_trials=4, max_epochs=4, grace_period=4, checkpoint="epoch")
    sub = _cli(cluster, "submit", str(job), "--address", cluster["address"], "--json")
    assert sub.exit_code == 0, sub.output
    sub_id = json.loads(sub.stdout)["submission_id"]
    out = cluster["tmp"] / "runs" / "survivor"
    # wait until trials are training (their first checkpoints exist), then kill worker node B
    deadline = time.time() + 300
    while time.time() < deadline:
        if list((out / "tune").glob("*/checkpoint_*")):
            break
        time.sleep(0.5)
    assert list((out / "tune").glob("*/checkpoint_*")), "no trial started"
    finished_before = set()
    study = out / "optuna_trials.json"
    if study.is_file():
        finished_before = {json.dumps(s["params"], sort_keys=True) for s in json.loads(study.read_text())
                           if s["state"] in ("COMPLETE", "PRUNED")}
    kill_group(cluster["procs"]["worker-b"])

    deadline = time.time() + 500
    status = "PENDING"
    while time.time() < deadline:
        status = json.loads(_cli(cluster, "jobs", "status", sub_id, "--address", cluster["address"],
                                 "--json").stdout)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = _cli(cluster, "jobs", "logs", sub_id, "--address", cluster["address"]).output
    assert status == "SUCCEEDED", logs[-4000:]
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 4 and all(t["state"] == "completed" for t in trials), trials
    final = {json.dumps(s["params"], sort_keys=True) for s in json.loads(study.read_text())
             if s["state"] == "COMPLETE"}
    assert finished_before <= final  # no trial finished before the kill was lost


def test_submit_ships_a_train_fn_entrypoint_with_the_modules_beside_it(cluster):
    # examples/python_task/loop_job.yaml: my_loop.py returns train_fn and imports my_task.py
    example = Path(__file__).resolve().parents[2] / "examples" / "python_task"
    src = cluster["tmp"] / "own-loop"
    src.mkdir()
    for name in ("my_loop.py", "my_task.py"):
        (src / name).write_text((example / name).read_text())
    data = yaml.safe_load((example / "loop_job.yaml").read_text())
    data.update(name="own-loop", storage={"path": str(cluster["tmp"] / "runs")},
                tracking={"uri": mlflow_uri(cluster['tmp']), "experiment": "own-loop"})
    data["search"].update(num_trials=2, max_epochs=1)
    job = src / "job.yaml"
    job.write_text(yaml.safe_dump(data))
    result = _cli(cluster, "submit", str(job), "--address", cluster["address"], "--wait", "--json")
    assert result.exit_code == 0, result.output[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    trials = pq.read_table(cluster["tmp"] / "runs" / "own-loop" / "trials.parquet").to_pylist()
    assert len(trials) == 2 and all(t["state"] == "completed" for t in trials)
