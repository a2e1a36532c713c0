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
from conftest import free_port, stop_group
from mlflow import MlflowClient
from typer.testing import CliRunner

from lrsearch.cli import app
from lrsearch.config import parse_job
from lrsearch.schedules import lr_curve
from lrsearch.tracking import TrackingError
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
    uri = f"sqlite:///{tmp}/mlruns.db"
    cwd = os.getcwd()
    os.chdir(tmp)  # a database store puts artifacts under ./mlruns: keep them out of the checkout
    try:
        result = run_search(_job(tmp, uri), show_progress=False)
    finally:
        os.chdir(cwd)
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
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", backend,
         "--artifacts-destination", str(artifacts), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
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


def test_server_outage_mid_search_loses_nothing(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    port = free_port()
    backend = f"sqlite:///{tmp_path}/server.db"
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(port, backend, tmp_path / "artifacts")
    job = parse_job({
        "name": "outage",
        "task": {"kind": "synthetic", "num_train": 4096, "num_val": 512, "batch_size": 64, "hidden": 256},
        "range_test": {"num_steps": 30},
        "search": {"num_trials": 3, "max_epochs": 4, "grace_period": 4, "max_concurrent_trials": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": uri, "experiment": "outage"},
    })
    root = tmp_path / "runs" / "outage"
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run_search(job, show_progress=False)), daemon=True)
    thread.start()
    try:
        client = MlflowClient(uri)
        deadline = time.time() + 240
        while time.time() < deadline:  # wait for the first trial's first epoch in MLflow
            try:
                exp = client.get_experiment_by_name("outage")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                if any("val_accuracy" in r.data.metrics for r in runs):
                    break
            except Exception:
                pass
            time.sleep(0.3)
        stop_group(server)  # the tracking server goes away mid-search
        deadline = time.time() + 120
        while _spooled(root) == 0 and thread.is_alive() and time.time() < deadline:
            time.sleep(0.2)
        spooled_during_outage = _spooled(root)
        assert spooled_during_outage > 0  # logging failed and was kept on disk, training went on
        time.sleep(2)
        server = _start_server(port, backend, tmp_path / "artifacts")  # back again
        thread.join(timeout=400)
        assert not thread.is_alive()
        result = box["result"]
        assert result.counts["total"] == 3 and result.counts["errored"] == 0
        if _spooled(root):  # the search ended while the server was still down: sync catches up
            r = runner.invoke(app, ["sync", str(root)])
            assert r.exit_code == 0, r.output
        assert _spooled(root) == 0
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id])
        children = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
        assert len(children) == 3 and len({r.data.tags["lrsearch.trial_id"] for r in children}) == 3
        for child in children:
            history = client.get_metric_history(child.info.run_id, "val_accuracy")
            assert sorted(m.step for m in history) == [1, 2, 3, 4]  # every epoch, none lost
            assert len(client.get_metric_history(child.info.run_id, "lr_step")) == 4 * 64
            assert child.data.tags["lrsearch.state"] == "completed"
        parent = next(r for r in runs if r.data.tags.get("lrsearch.role") == "search")
        assert parent.info.status == "FINISHED"
        assert "best_config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    finally:
        stop_group(server)


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
