"""Many searches at once on one token-auth loopback cluster (issue #24): six `lrsearch submit` at
the same moment (the same job twice, one asking for more CPUs than any node has), Ray queueing
the trials on two 1-CPU workers, one worker killed while they run.

The cluster is test_multinode's (head with 0 CPUs + two 1-CPU workers, started with the commands
of ``lrsearch.infra.cluster``), for this module only, with two flags that keep it apart from other
Rays on the machine: the head's dashboard agent on a free port (Ray's default, 52365, may be held
by another Ray, and the Jobs API then answers "no available agent" for good) and its own
``--temp-dir`` (a submitted job's driver gets the cluster "auto" finds there, in
``ray_current_cluster``: under the shared /tmp/ray that is the last cluster anyone started on the
machine). Every process the fixture started is killed by its process group at the
end of the module, whatever the test's outcome; other Ray instances on the machine are left alone.
"""

from __future__ import annotations

import json
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, kill_group, loopback_cluster, mlflow_uri
from mlflow import MlflowClient
from test_multinode import _cli

NUM_TRIALS, MAX_EPOCHS, BUDGET = 2, 2, 8
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with loopback_cluster(tmp_path_factory.mktemp("load")) as c:
        yield c


def _load_job(cluster, name: str, *, cpu: float = 1, seed: int = 0):
    tmp = cluster["tmp"]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "task": {"kind": "synthetic", "num_train": 1024, "num_val": 256, "batch_size": 64, "hidden": 64},
        "range_test": {"num_steps": 10},
        # grace_period = max_epochs: ASHA prunes nothing, every trial trains both epochs; a checkpoint
        # each epoch: the worker kill comes while trials are between epochs
        "search": {"num_trials": NUM_TRIALS, "max_epochs": MAX_EPOCHS, "grace_period": MAX_EPOCHS,
                   "max_concurrent_trials": 1, "max_failures": 3, "checkpoint": "epoch", "seed": seed,
                   "budget": {"trial_epochs": BUDGET}},
        "resources": {"cpu": cpu},
        "storage": {"path": str(tmp / "runs")},
        # one sqlite store for every search and node (a shared file here; an MLflow server in real life)
        "tracking": {"uri": mlflow_uri(tmp), "experiment": name},
    }))
    return path


def _submit_all(cluster, paths) -> list[subprocess.CompletedProcess]:
    """`lrsearch submit` of every path in its own process, all started at once."""
    env = {**cluster["env"], "RAY_AUTH_TOKEN": cluster["token"]}
    procs = [subprocess.Popen([str(BIN / "lrsearch"), "submit", str(p), "--address", cluster["address"], "--json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in paths]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _jobs(cluster) -> dict[str, dict]:
    listed = _cli(cluster, "jobs", "list", "--address", cluster["address"], "--json")
    assert listed.exit_code == 0, listed.output[-3000:]
    return {j["submission_id"]: j for j in json.loads(listed.stdout)["jobs"]}


def _stop_unfinished(cluster, ids) -> None:
    # a failed assertion must not leave searches running on the cluster until its teardown
    for sub_id in ids:
        _cli(cluster, "jobs", "stop", sub_id, "--address", cluster["address"])


def test_six_searches_at_once_queue_survive_a_node_kill_and_report_progress(cluster):
    # the store exists before six drivers open it at once, as an MLflow server's database does
    # (sqlite: concurrent first-time schema migrations race in MLflow, not in lrsearch)
    uri = mlflow_uri(cluster["tmp"])
    client = MlflowClient(uri)

    names = ["load-a", "load-b", "load-c", "load-d"]
    paths = {n: _load_job(cluster, n, seed=i) for i, n in enumerate(names)}
    big = _load_job(cluster, "load-big", cpu=4)
    order = [paths["load-a"], paths["load-b"], paths["load-a"], paths["load-c"], big, paths["load-d"]]
    results = _submit_all(cluster, order)

    # the over-ask: refused at submit, one line, exit 2, nothing sent
    refused = results[4]
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "resources.cpu: got 4 per trial" in lines[0] and "has 1 CPU" in lines[0], lines[0]

    infos = []
    for r in results[:4] + results[5:]:
        assert r.returncode == 0, r.stderr[-3000:]
        infos.append(json.loads(r.stdout))
    first, dup = infos[0], infos[2]
    # the same job twice at the same moment is one submission: the second attaches to the first
    assert first["submission_id"] == dup["submission_id"]
    assert sorted([first["already_submitted"], dup["already_submitted"]]) == [False, True], (first, dup)
    ids = {n: i["submission_id"] for n, i in zip(["load-a", "load-b", "load-a", "load-c", "load-d"], infos, strict=True)}
    assert len(set(ids.values())) == 4 and all(ids[n].startswith(f"lrsearch-{n}-") for n in names)

    try:
        _wait_kill_and_finish(cluster, ids)
    except BaseException:
        _stop_unfinished(cluster, ids.values())
        raise

    # `lrsearch jobs list`: each search once, its state, trials done of total, best so far, budget spent
    listed = _jobs(cluster)
    assert not any(j["job"] == "load-big" for j in listed.values())
    for name in names:
        assert sum(1 for j in listed.values() if j["job"] == name) == 1
        job = listed[ids[name]]
        assert job["status"] == "SUCCEEDED", _logs(cluster, ids[name])
        p = job["progress"]
        assert p["trials_done"] == NUM_TRIALS and p["num_trials"] == NUM_TRIALS, p
        assert isinstance(p["best"], float) and 0.0 <= p["best"] <= 1.0, p
        # every trial-epoch counted once, the retried ones' replays included only once
        assert p["budget"] == {"kind": "trial_epochs", "limit": BUDGET, "spent": NUM_TRIALS * MAX_EPOCHS,
                               "remaining": BUDGET - NUM_TRIALS * MAX_EPOCHS, "exhausted": False}, p
    table = subprocess.run([str(BIN / "lrsearch"), "jobs", "list", "--address", cluster["address"]],
                           env={**cluster["env"], "COLUMNS": "400"}, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    for name in names:
        row = next(line for line in table.stdout.splitlines() if ids[name] in line)
        assert "SUCCEEDED" in row and f"{NUM_TRIALS}/{NUM_TRIALS}" in row, row
        assert f"{NUM_TRIALS * MAX_EPOCHS} / {BUDGET} trial_epochs" in row, row
        assert f"{listed[ids[name]]['progress']['best']:.4f}" in row, row

    # every search: its own results, one MLflow parent with its own children, nothing left RUNNING
    parents = set()
    for name in names:
        out = cluster["tmp"] / "runs" / name
        trials = pq.read_table(out / "trials.parquet").to_pylist()
        assert len(trials) == NUM_TRIALS and all(t["state"] == "completed" for t in trials), trials
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        assert [r.info.status for r in runs if r.info.status == "RUNNING"] == [], name
        searches = [r for r in runs if r.data.tags.get("lrsearch.role") == "search"]
        assert len(searches) == 1, [r.info.run_id for r in searches]
        parent = searches[0]
        assert parent.info.status == "FINISHED" and parent.data.tags["ray.submission_id"] == ids[name]
        children = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
        assert len(children) == NUM_TRIALS, [(r.info.run_id, r.data.tags.get("lrsearch.state")) for r in children]
        assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
        assert all(c.info.status == "FINISHED" for c in children)
        assert {c.data.tags["lrsearch.trial_id"] for c in children} == {t["trial_id"] for t in trials}
        parents.add(parent.info.run_id)
    assert len(parents) == len(names)
    everywhere = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    assert [r.info.run_id for r in everywhere if r.info.status == "RUNNING"] == []


def _logs(cluster, sub_id: str) -> str:
    return _cli(cluster, "jobs", "logs", sub_id, "--address", cluster["address"]).output[-4000:]


def _wait_kill_and_finish(cluster, ids: dict[str, str]) -> None:
    """Poll `lrsearch jobs list` until the four searches end; kill worker node B once trials are
    training (a first checkpoint exists) while searches are still running."""
    runs = cluster["tmp"] / "runs"
    seen: dict[str, list[int]] = {s: [] for s in ids.values()}
    peak_running, killed = 0, False
    deadline = time.time() + 1800
    while True:
        listed = _jobs(cluster)
        states = {s: listed[s]["status"] for s in ids.values()}
        peak_running = max(peak_running, sum(1 for v in states.values() if v == "RUNNING"))
        for s in ids.values():
            p = listed[s]["progress"]
            if p:
                seen[s].append(p["trials_done"])
        if not killed and list(runs.glob("*/tune/*/checkpoint_*")):
            unfinished = [s for s, v in states.items() if v not in TERMINAL]
            assert len(unfinished) >= 2, states  # the kill comes while searches run
            kill_group(cluster["procs"]["worker-b"])
            killed = True
        if all(v in TERMINAL for v in states.values()):
            break
        assert time.time() < deadline, (states, {s: seen[s][-1:] for s in seen})
        time.sleep(3)
    failed = {s: _logs(cluster, s) for s, v in states.items() if v != "SUCCEEDED"}
    assert not failed, failed
    assert killed, "no trial reached its first checkpoint before every search ended"
    # more searches ran at once than the cluster has CPUs for trials: Ray queued their trials
    assert peak_running >= 3, peak_running
    for s, done in seen.items():
        assert done == sorted(done) and all(0 <= d <= NUM_TRIALS for d in done), (s, done)
