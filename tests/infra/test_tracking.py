"""MLflow tracking and export against real stores: sqlite, a real `mlflow server` on 127.0.0.1
(stopped and restarted mid-search), and PostgreSQL when it is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import free_port, mlflow_uri, stop_group
from mlflow import MlflowClient
from typer.testing import CliRunner

from lrsearch.cli import app
from lrsearch.infra.tracking import TrackingError
from lrsearch.job.parse import parse_job
from lrsearch.optim.schedules import lr_curve
from lrsearch.tuning import run_search

runner = CliRunner()
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _job(tmp_path, uri, name="tracked", **search):
    return parse_job({
        "name": name,
        "task": {"kind": "synthetic", "num_train": 512, "num_val": 256, "batch_size": 64},
        "range_test": {"num_steps": 40},
        "search": {"num_trials": 5, "max_epochs": 3, "grace_period": 1, "reduction_factor": 3,
                   "max_concurrent_trials": 2, **search},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": uri, "experiment": f"exp-{name}"},
    })


@pytest.fixture(scope="module")
def tracked_search(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    uri = mlflow_uri(tmp)
    result = run_search(_job(tmp, uri), show_progress=False)  # artifacts: next to the store, not in ./
    return tmp, uri, result


def test_parent_run_with_every_trial_nested(tracked_search):
    tmp, uri, result = tracked_search
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp-tracked")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lrsearch.role") == "search"]
    children = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["lrsearch.job"] == "tracked" and "lrsearch.version" in parent.data.tags
    assert float(parent.data.params["range_test.bounds_low"]) == pytest.approx(result.range_test["bounds"][0])
    assert "range_test.steepest" in parent.data.metrics
    # what mattered: the study's parameter importances, as in the CLI summary and --json
    assert {f"importance.{k}": pytest.approx(v) for k, v in result.importances.items()} == {
        k: v for k, v in parent.data.metrics.items() if k.startswith("importance.")}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"job.yaml", "space.yaml", "trials.parquet", "search.png", "lr_curves_top.png",
            "best_config.yaml", "range_test"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "range_test")} == {
        "range_test/range_test.png", "range_test/range_test.json"}

    trials = {t["trial_id"]: t for t in pq.read_table(result.paths["trials"]).to_pylist()}
    assert len(children) == len(trials) == 5
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        t = trials[child.data.tags["lrsearch.trial_id"]]
        expected = f"pruned at rung {t['stopped_at_epoch']}" if t["state"] == "pruned" else t["state"]
        assert child.data.tags["lrsearch.state"] == expected
        assert child.info.status == ("FINISHED" if t["state"] == "completed" else "KILLED")
        assert float(child.data.params["max_lr"]) == pytest.approx(t["max_lr"])
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, t["stopped_at_epoch"] + 1))
        lr_steps = client.get_metric_history(child.info.run_id, "lr_step")
        assert len(lr_steps) == 8 * t["stopped_at_epoch"]  # 512 / 64 optimizer steps per epoch


def _best_child_lrs(uri, result):
    client = MlflowClient(uri)
    best_id = result.best.trial_id
    child = next(r for r in client.search_runs([result.tracking["experiment_id"]])
                 if r.data.tags.get("lrsearch.trial_id") == best_id)
    return [m.value for m in sorted(client.get_metric_history(child.info.run_id, "lr_step"), key=lambda m: m.step)]


def test_export_yaml_json_reproduce_the_best_trials_lr_curve(tracked_search, tmp_path):
    _, uri, result = tracked_search
    logged = _best_child_lrs(uri, result)
    out = tmp_path / "best.yaml"
    r = runner.invoke(app, ["export", "--experiment", "exp-tracked", "--tracking-uri", uri, "-o", str(out)])
    assert r.exit_code == 0, r.output
    best = yaml.safe_load(out.read_text())
    horizon = best["search_horizon"]
    assert len(logged) == horizon["total_steps"]
    rebuilt = lr_curve(best["schedule"], horizon["total_steps"], best["max_lr"], **horizon["schedule_params"])
    assert rebuilt == pytest.approx(logged, rel=1e-12, abs=0)
    r = runner.invoke(app, ["export", "--run-id", result.tracking["run_id"], "--tracking-uri", uri, "-f", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == best


def test_export_torch_snippet_runs_and_matches(tracked_search):
    _, uri, result = tracked_search
    r = runner.invoke(app, ["export", "--experiment", "exp-tracked", "--tracking-uri", uri, "--format", "torch"])
    assert r.exit_code == 0, r.output
    model = torch.nn.Linear(3, 2)
    scope = {"model": model}
    exec(r.stdout, scope)  # the snippet a user pastes
    total = result.best.search_horizon["total_steps"]
    optimizer = scope["build_optimizer"](model)
    scheduler = scope["build_lr_scheduler"](optimizer, total)  # the search's horizon: the logged curve
    lrs = []
    for _ in range(total):
        lrs.append(max(g["lr"] for g in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(_best_child_lrs(uri, result), rel=1e-12, abs=0)


def test_export_errors_are_one_line(tracked_search):
    _, uri, _ = tracked_search
    r = runner.invoke(app, ["export", "--experiment", "nope", "--tracking-uri", uri])
    assert r.exit_code == 2 and "no experiment 'nope'" in r.output and "exp-tracked" in r.output
    r = runner.invoke(app, ["export", "--tracking-uri", uri])
    assert r.exit_code == 2 and "exactly one of --experiment" in r.output
    r = runner.invoke(app, ["export", "--experiment", "exp-tracked", "--tracking-uri", uri, "-f", "onnx"])
    assert r.exit_code == 2 and "--format: got 'onnx'" in r.output


def test_unreachable_server_fails_before_anything_starts(local_ray, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    job = _job(tmp_path, uri, name="unreachable")
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking store"):
        run_search(job, show_progress=False)
    assert not (tmp_path / "runs" / "unreachable" / "tune").exists()  # no trial ran
    assert not (tmp_path / "runs" / "unreachable" / "range_test.json").exists()


# --------------------------------------------------------------------------------------------
# A real mlflow server, stopped and restarted in the middle of a search
# --------------------------------------------------------------------------------------------


def _start_server(port: int, backend: str, artifacts: Path) -> subprocess.Popen:
    # no job runner (GenAI jobs): one process less to start on a busy machine
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", backend,
         "--artifacts-destination", str(artifacts), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            MlflowClient(f"http://127.0.0.1:{port}").search_experiments(max_results=1)
            return proc
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited") from None
            time.sleep(0.5)
    stop_group(proc)
    raise RuntimeError("mlflow server did not come up")


def _spooled(root: Path) -> int:
    spool = root / "mlflow-spool"
    return sum(1 for _ in spool.rglob("*.json")) if spool.exists() else 0


def _end_spooled(root: Path) -> bool:
    """Whether the search's end (its parent run's terminate operation) waits in the spool."""
    return any('"terminate"' in f.read_text() for f in (root / "mlflow-spool" / "_search").glob("*.json"))


def _wait(until, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not until():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def gated_loop(trial, gate: str) -> None:
    """A tiny loop; after its first epoch it says so (``GATE.ready``; logged by then) and waits for
    ``GATE.down`` (the test has stopped the tracking server): the rest is logged while it is down."""
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = trial.optimizer(model)
    scheduler = trial.scheduler(optimizer, total_steps=4 * trial.max_epochs)
    for epoch in range(trial.start_epoch, trial.max_epochs):
        for i in range(4):
            loss = F.cross_entropy(model(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        if trial.report(epoch + 1, accuracy=accuracy):
            return
        Path(f"{gate}.ready").touch()
        deadline = time.time() + 300
        while not Path(f"{gate}.down").exists() and time.time() < deadline:
            time.sleep(0.2)


class _Server:
    """A real ``mlflow server`` on 127.0.0.1 that a test stops and starts again (same port, same store)."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.backend, self.artifacts = free_port(), f"sqlite:///{tmp}/server.db", tmp / "artifacts"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = _start_server(self.port, self.backend, self.artifacts)

    def stop(self) -> None:
        stop_group(self.proc)

    def start(self) -> None:
        if self.proc.poll() is not None:
            self.proc = _start_server(self.port, self.backend, self.artifacts)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module's outage tests (each stops it and starts it again)."""
    server = _Server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


def _outage_search(tmp: Path, server: _Server, name: str, flush_timeout_s: float):
    """A search whose tracking server stops after the first epoch is logged; returns the thread
    running it, the box its result lands in, and its results directory."""
    from functools import partial

    import lrsearch

    job = {"name": name, "space": {"family": "default", "schedules": ["cosine", "linear"],
                                   "max_lr": {"low": 1e-3, "high": 0.1}},
           "search": {"num_trials": 3, "max_epochs": 2, "early_stopping": "none", "max_concurrent_trials": 1},
           "storage": {"path": str(tmp / "runs")},
           "tracking": {"uri": server.uri, "experiment": name, "flush_timeout_s": flush_timeout_s}}
    gate = str(tmp / "gate")
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=lrsearch.search(job, train_fn=partial(gated_loop, gate=gate))),
                              daemon=True)
    thread.start()
    _wait(lambda: Path(f"{gate}.ready").exists() or not thread.is_alive(), "the first epoch")
    server.stop()  # the tracking server goes away mid-search
    Path(f"{gate}.down").touch()
    return thread, box, tmp / "runs" / name


def _assert_all_logged(uri: str, name: str, root: Path) -> None:
    """Every trial's every epoch in MLflow, nothing spooled, and no run left RUNNING."""
    assert _spooled(root) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert [r for r in runs if r.info.status == "RUNNING"] == []
    children = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
    assert len(children) == 3 and len({r.data.tags["lrsearch.trial_id"] for r in children}) == 3
    for child in children:
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")) == [1, 2]
        assert len(client.get_metric_history(child.info.run_id, "lr_step")) == 2 * 4
        assert child.data.tags["lrsearch.state"] == "completed" and child.info.status == "FINISHED"
    parent = next(r for r in runs if r.data.tags.get("lrsearch.role") == "search")
    assert parent.info.status == "FINISHED" and parent.data.tags["lrsearch.state"] == "finished"
    assert "best_config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_a_search_ending_while_the_server_is_down_logs_everything_once_it_is_back(local_ray, server, tmp_path):
    server.start()
    thread, box, root = _outage_search(tmp_path, server, "outage", flush_timeout_s=600)
    # the trials end, the search ends and waits (tracking.flush_timeout_s) for the server
    _wait(lambda: _end_spooled(root) or not thread.is_alive(), "the search's end")
    assert thread.is_alive() and _spooled(root) > 0  # logging failed and was kept on disk
    time.sleep(2)
    server.start()  # back again, within flush_timeout_s
    thread.join(timeout=600)
    assert not thread.is_alive()
    result = box["result"]
    assert result.counts["completed"] == 3 and result.paths["mlflow_pending"] == "0"
    _assert_all_logged(server.uri, "outage", root)  # with no manual step
    state = json.loads((root / "mlflow.json").read_text())
    assert state["ended"] == "FINISHED" and state["ended_logged"] is True


def test_what_a_search_left_pending_is_logged_by_the_next_command(local_ray, server, tmp_path, capsys):
    server.start()
    thread, box, root = _outage_search(tmp_path, server, "later", flush_timeout_s=3)
    thread.join(timeout=300)
    assert not thread.is_alive()
    result = box["result"]
    pending = int(result.paths["mlflow_pending"])
    assert pending > 0 and _spooled(root) == pending  # the search ended, saying what is pending
    err = capsys.readouterr().err
    assert "not reachable" in err and f"{pending} logging operations still pending" in err
    assert f"lrsearch sync {root}" in err  # one line naming the command that replays it
    server.start()
    assert MlflowClient(server.uri).get_run(result.tracking["run_id"]).info.status == "RUNNING"
    # the next command on the job (here the export of its best config) logs it first
    r = runner.invoke(app, ["export", "--run-id", result.tracking["run_id"], "--tracking-uri", server.uri])
    assert r.exit_code == 0, r.output
    assert f"logged {pending} operations" in r.stderr and "max_lr" in r.stdout
    _assert_all_logged(server.uri, "later", root)
    # nothing pending now: the next one is quiet
    r = runner.invoke(app, ["export", "--run-id", result.tracking["run_id"], "--tracking-uri", server.uri])
    assert r.exit_code == 0 and "note" not in r.stderr


def _never_sent(tmp_path: Path) -> tuple[str, Path, str, str]:
    """A search and its final run that ended while the store was down, their processes gone: the
    search's last logging spooled, the final run's end never sent. Returns the store, the results
    directory, the search's and the final run's ids (both RUNNING in the store)."""
    from lrsearch.infra.tracking.store import _spool_write

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("never-sent", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, tags={"lrsearch.role": "search"}).info.run_id
    final = client.create_run(exp, tags={"lrsearch.role": "final", "mlflow.parentRunId": parent}).info.run_id
    root = tmp_path / "runs" / "job"
    (root / "final").mkdir(parents=True)
    (root / "mlflow.json").write_text(json.dumps({"uri": uri, "experiment_id": exp, "run_id": parent,
                                                  "search_id": "s1", "ended": "FINISHED", "ended_logged": False}))
    _spool_write(str(root / "mlflow-spool"), "_search", {"op": "batch", "params": {"num_trials": 3}})
    (root / "final" / "state.json").write_text(json.dumps({"run_id": final, "uri": uri, "ended": "FAILED"}))
    return uri, root, parent, final


def _assert_healed(uri: str, root: Path, parent: str, final: str) -> None:
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.params["num_trials"] == "3"
    assert client.get_run(final).info.status == "FAILED"
    assert json.loads((root / "mlflow.json").read_text())["ended_logged"] is True
    assert json.loads((root / "final" / "state.json").read_text())["ended_logged"] is True
    assert _spooled(root) == 0


def test_the_next_command_ends_runs_whose_end_the_store_never_got(tmp_path):
    import lrsearch
    from lrsearch.errors import SearchError
    from lrsearch.infra.tracking import heal

    uri, root, parent, final = _never_sent(tmp_path)
    job = {"name": "job", "storage": {"path": str(tmp_path / "runs")},
           "tracking": {"uri": uri, "experiment": "never-sent"}}
    # the next command (a final run of the job) logs that first: the search is no longer "running"
    with pytest.raises(SearchError, match="has no completed trial"):
        lrsearch.train(job)
    _assert_healed(uri, root, parent, final)
    assert heal(root) == 0 and heal(tmp_path / "nothing-here") == 0
    r = runner.invoke(app, ["sync", str(root)])  # by hand: nothing left
    assert r.exit_code == 0 and "all logged to" in r.stdout and "note" not in r.stderr


def test_jobs_status_of_an_ended_job_heals_its_results(tmp_path, monkeypatch):
    """A submitted search's results on storage this machine reads (an absolute path, as on a shared
    mount): ``jobs status`` of the ended job logs what the store missed. (Ray's job client is
    stubbed: the Ray cluster is not what this checks; tests/infra/test_multinode.py runs a real one.)"""
    from types import SimpleNamespace

    from lrsearch.infra import jobs

    uri, root, parent, final = _never_sent(tmp_path)
    info = SimpleNamespace(status="SUCCEEDED", message="", entrypoint="lrsearch search job.yaml", start_time=0,
                           end_time=1, metadata={"lrsearch.job": "job", "lrsearch.results": str(root)})
    client = SimpleNamespace(get_job_info=lambda job_id: info, get_job_logs=lambda job_id: "")
    monkeypatch.setattr(jobs, "_client", lambda address: client)
    assert jobs.job_status("http://127.0.0.1:8265", "lrsearch-job-1")["status"] == "SUCCEEDED"
    _assert_healed(uri, root, parent, final)


def test_the_default_store_is_mlflows_own(tmp_path, monkeypatch, capsys):
    from lrsearch.infra.tracking import resolve_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking(None, None, "j") == (f"sqlite:///{tmp_path / 'mlflow.db'}", "j")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking(None, None, "j")[0] == "http://127.0.0.1:5000"  # the environment wins
    assert resolve_tracking("sqlite:///x.db", "e", "j") == (f"sqlite:///{tmp_path / 'x.db'}", "e")  # the job too
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # an earlier lrsearch's ./mlruns.db is read (with one note) while there is no ./mlflow.db
    (tmp_path / "mlruns.db").write_bytes(b"")
    capsys.readouterr()
    for _ in range(3):
        assert resolve_tracking(None, None, "j")[0] == f"sqlite:///{tmp_path / 'mlruns.db'}"
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "mv mlruns.db mlflow.db" in err
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert resolve_tracking(None, None, "j")[0] == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_sqlite_stores_artifacts_sit_next_to_it_wherever_the_command_runs(tmp_path, monkeypatch):
    from lrsearch.infra.tracking.store import new_experiment

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not where the store is
    uri = f"sqlite:///{tmp_path}/store.db"
    client = MlflowClient(uri)
    exp = client.get_experiment(new_experiment(client, uri, "a b/c"))
    assert exp.artifact_location.removeprefix("file://") == str(tmp_path / "mlruns" / "a-b-c")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_bare_mlflow_sees_a_search_on_the_defaults(local_ray, tmp_path, monkeypatch):
    """No tracking URI anywhere: the search's runs are where MLflow itself looks first."""
    from functools import partial

    import lrsearch

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "gate.down").touch()  # no gate here
    result = lrsearch.search({"name": "bare", "search": {"num_trials": 2, "max_epochs": 1, "early_stopping": "none"}},
                             train_fn=partial(gated_loop, gate=str(tmp_path / "gate")))
    assert result.tracking["uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlruns" / "bare" / result.tracking["run_id"] / "artifacts" / "best_config.yaml").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    code = ("import mlflow; runs = mlflow.search_runs(search_all_experiments=True); "
            "print(sorted(runs['tags.lrsearch.role']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['search', 'trial', 'trial']"


# --------------------------------------------------------------------------------------------
# PostgreSQL backend (Debian's postgresql, started here on 127.0.0.1)
# --------------------------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (base / "initdb").exists():
            return base
    return None


@pytest.mark.skipif(_pg_bin() is None, reason="PostgreSQL is not installed (make test installs it)")
def test_postgresql_backend(local_ray, tmp_path, monkeypatch):
    import pwd

    pg = _pg_bin()
    # PostgreSQL refuses to run as root: as root, run it as the 'postgres' user in a directory that
    # user can reach (pytest's tmp_path sits under a root-only directory)
    base = Path(tempfile.mkdtemp(prefix="lrsearch-pg-"))
    data = base / "pgdata"
    port = free_port()
    user = "postgres" if os.geteuid() == 0 else None
    data.mkdir()
    run_as = []
    if user:
        pwd.getpwnam(user)
        shutil.chown(base, user=user)
        shutil.chown(data, user=user)
        run_as = ["runuser", "-u", user, "--"]
    subprocess.run([*run_as, str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "lrsearch"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "-o",
                    f"-h 127.0.0.1 -p {port} -k {data}", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*run_as, str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "lrsearch",
                        "mlflow"], check=True, capture_output=True)
        uri = f"postgresql://lrsearch@127.0.0.1:{port}/mlflow"
        work = tmp_path / "work"
        work.mkdir()
        monkeypatch.chdir(work)  # artifacts of a database store default to ./mlruns
        result = run_search(_job(work, uri, name="pg", num_trials=2, max_epochs=2), show_progress=False)
        client = MlflowClient(uri)
        runs = client.search_runs([result.tracking["experiment_id"]])
        assert len([r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]) == 2
        assert len([r for r in runs if r.data.tags.get("lrsearch.role") == "search"]) == 1
    finally:
        subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The MLflow UI, seen in headless Chromium (optional: runs where Chromium is installed)
# --------------------------------------------------------------------------------------------


def _chromium(url: str, profile: Path, *extra: str, until: tuple[str, ...] = ()) -> str:
    """Load ``url`` headless; with ``until``, retry (the UI fetches runs from a real server, which a
    busy machine answers slowly) until every string in it is on the rendered page."""
    page = ""
    for budget in (20000, 40000, 80000):
        page = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,900", f"--virtual-time-budget={budget}",
             *extra, url],
            check=True, capture_output=True, text=True, timeout=300,
        ).stdout
        page = re.sub(r"<[^>]+>", "", page)  # the rendered text, without markup
        if all(text in page for text in until):
            break
    return page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
def test_mlflow_ui_shows_parent_and_nested_runs(tracked_search, tmp_path):
    from PIL import Image

    tmp, uri, result = tracked_search
    port = free_port()
    server = _start_server(port, uri, tmp / "artifacts-ui")
    try:
        exp_id, run_id = result.tracking["experiment_id"], result.tracking["run_id"]
        client = MlflowClient(uri)
        parent = client.get_run(run_id)
        child = next(r for r in client.search_runs([exp_id]) if r.data.tags.get("lrsearch.role") == "trial")
        base = f"http://127.0.0.1:{port}/#/experiments/{exp_id}"
        # the runs table: the search's parent run, with its trials nested under it
        expected = (parent.info.run_name, f"{len(result.trials) + 1} matching runs")
        runs_page = _chromium(f"{base}/runs", tmp_path / "chrome", "--dump-dom", until=expected)
        assert all(text in runs_page for text in expected), [t for t in expected if t not in runs_page]
        # a trial's run: nested under the search's run, with its per-epoch metrics, the LR of every
        # optimizer step and its final state (the model-metrics tab charts them: screenshot below)
        expected = (child.info.run_name, "Parent run", "lr_step", "val_accuracy", "lrsearch.state")
        child_page = _chromium(f"{base}/runs/{child.info.run_id}", tmp_path / "chrome", "--dump-dom",
                               until=expected)
        assert all(text in child_page for text in expected), [t for t in expected if t not in child_page]
        # the parent's artifacts: the plots and the trial table
        expected = ("search.png", "lr_curves_top.png", "trials.parquet", "best_config.yaml")
        artifacts_page = _chromium(f"{base}/runs/{run_id}/artifacts", tmp_path / "chrome", "--dump-dom",
                                   until=expected)
        assert all(text in artifacts_page for text in expected), [t for t in expected if t not in artifacts_page]
        for name, url in (("runs", f"{base}/runs"), ("trial", f"{base}/runs/{child.info.run_id}/model-metrics")):
            shot = tmp_path / f"{name}.png"
            _chromium(url, tmp_path / "chrome", f"--screenshot={shot}")
            assert Image.open(shot).size == (1400, 900)
    finally:
        stop_group(server)
