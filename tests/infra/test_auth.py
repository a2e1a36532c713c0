"""Authenticated MLflow, end to end: a real ``mlflow server --app-name basic-auth`` on 127.0.0.1
(started once for the module, exactly as :func:`lrsearch.infra.cluster.mlflow_server_command` builds it,
with a temporary sqlite backend and auth database), a normal user created by the admin through
MLflow's own ``AuthServiceClient``, and ``lrsearch search`` / ``export`` run as a user runs them.

What it shows: the server refuses anonymous writes and has no default admin password; a search and
its export work with the login in the environment; a missing or wrong login stops with one line
before the range test; and no credential ends up in the output, MLflow's params, tags and
artifacts, the results directory, or what ``lrsearch submit`` sends to Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import yaml
from conftest import free_port, joined, stop_group
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lrsearch.errors import TrackingError
from lrsearch.infra.cluster import mlflow_server_command
from lrsearch.infra.tracking import check_reachable
from lrsearch.redact import redact_uri

BIN = Path(sys.executable).parent
ADMIN_PASSWORD = f"admin-{secrets.token_hex(12)}"
USER, PASSWORD = "alice", f"alice-{secrets.token_hex(12)}"
SECRETS = (ADMIN_PASSWORD, PASSWORD)
LOGIN_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _env(**extra: str) -> dict[str, str]:
    """A fresh shell's environment: no MLflow login, no Ray cluster to join, unless given."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_", "RAY_ADDRESS"))}
    return {**env, **extra}


def _login(password: str = PASSWORD) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}


def _server_env(tmp: Path, **extra: str) -> dict[str, str]:
    ini = tmp / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp}/auth.db\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    # no job-execution workers: this server only tracks
    return _env(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
                MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **extra)


def _server_argv(tmp: Path, port: int) -> list[str]:
    argv = mlflow_server_command(port=port, backend_store_uri=f"sqlite:///{tmp}/mlflow.db",
                                 artifacts_destination=str(tmp / "artifacts"))
    return [str(BIN / "mlflow"), *argv[1:], "--workers", "1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp / "server.log", "w") as log:
        proc = subprocess.Popen(_server_argv(tmp, port), env=_server_env(tmp, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD),
                                cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)  # the one path without a login
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not come up:\n{(tmp / 'server.log').read_text()[-3000:]}") from None
                time.sleep(1)
        # a normal user, created by the admin with MLflow's own client
        from mlflow.server.auth.client import AuthServiceClient

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            AuthServiceClient(url).create_user(USER, PASSWORD)
        yield {"url": url, "port": port, "tmp": tmp}
    finally:
        stop_group(proc)


def _job_file(tmp: Path, url: str, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "task": {"kind": "synthetic", "num_train": 256, "num_val": 128, "batch_size": 64},
        "range_test": {"num_steps": 20},
        "search": {"num_trials": 3, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2,
                   "max_concurrent_trials": 2},
        "storage": {"path": str(tmp / "runs")},
        "tracking": {"uri": url, "experiment": f"auth-{name}"},
    }))
    return path


def _lrsearch(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lrsearch"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def searched(server, tmp_path_factory):
    """``lrsearch search`` and ``lrsearch export`` with the login in the environment."""
    tmp = tmp_path_factory.mktemp("auth-search")
    env = _env(**_login())
    search = _lrsearch("search", str(_job_file(tmp, server["url"], "authed")), env=joined(env), cwd=tmp)
    export = _lrsearch("export", "--experiment", "auth-authed", "--tracking-uri", server["url"], env=env, cwd=tmp)
    return {"tmp": tmp, "search": search, "export": export, "results": tmp / "runs" / "authed"}


def _client(monkeypatch, url: str) -> MlflowClient:
    for var, value in _login().items():
        monkeypatch.setenv(var, value)
    return MlflowClient(url)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def test_server_has_no_default_admin_password(tmp_path):
    """The command the cluster files run refuses to start without MLFLOW_AUTH_ADMIN_PASSWORD."""
    proc = subprocess.run(_server_argv(tmp_path, free_port()), env=_server_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in proc.stdout + proc.stderr


def test_anonymous_and_wrong_logins_are_refused(server, monkeypatch):
    api = f"{server['url']}/api/2.0/mlflow/experiments/create"
    assert requests.post(api, json={"name": "anon"}, timeout=30).status_code == 401
    assert requests.post(api, json={"name": "anon"}, auth=(USER, "wrong-password-1"), timeout=30).status_code == 401
    # the UI's own API and its page too (Chromium, sent no login, waits for one)
    ui = f"{server['url']}/ajax-api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(ui, timeout=30).status_code == 401
    assert requests.get(f"{server['url']}/", timeout=30).status_code == 401
    for var in LOGIN_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MlflowException) as refused:
        MlflowClient(server["url"]).create_experiment("anon")
    assert refused.value.error_code == "UNAUTHENTICATED"
    assert _client(monkeypatch, server["url"]).get_experiment_by_name("anon") is None  # nothing was written


def test_check_reachable_names_what_to_set(server, monkeypatch):
    url = server["url"]
    for var in LOGIN_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TrackingError, match="requires a login and none was sent; set MLFLOW_TRACKING_USERNAME "
                                            "and MLFLOW_TRACKING_PASSWORD .*MLFLOW_TRACKING_TOKEN"):
        check_reachable(url)
    wrong = url.replace("://", f"://{USER}:wrong-password-1@")
    with pytest.raises(TrackingError, match="rejected the credentials") as rejected:
        check_reachable(wrong)
    assert "wrong-password-1" not in str(rejected.value) and url in str(rejected.value)
    check_reachable(url.replace("://", f"://{USER}:{PASSWORD}@"))  # credentials in the URI work
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    check_reachable(url)


def test_redact_uri():
    assert redact_uri("http://alice:pw@mlflow:5000/x") == "http://mlflow:5000/x"
    assert redact_uri("https://TOKEN@mlflow") == "https://mlflow"
    assert redact_uri("http://u:p@ss@h:1") == "http://h:1"
    assert redact_uri("postgresql+psycopg://mlflow:pw@db:5432/m") == "postgresql+psycopg://mlflow@db:5432/m"
    for plain in ("http://127.0.0.1:5000", "sqlite:////tmp/mlruns.db", "postgresql://mlflow@db/m"):
        assert redact_uri(plain) == plain
    assert redact_uri("failed: http://a:b@h:1/api/2.0 refused") == "failed: http://h:1/api/2.0 refused"


# --------------------------------------------------------------------------------------------
# lrsearch against it
# --------------------------------------------------------------------------------------------


def test_search_and_export_with_the_login_in_the_environment(searched, server, monkeypatch):
    search, export = searched["search"], searched["export"]
    assert search.returncode == 0, search.stderr[-3000:]
    assert export.returncode == 0, export.stderr[-3000:]
    client = _client(monkeypatch, server["url"])
    exp = client.get_experiment_by_name("auth-authed")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("lrsearch.role") == "search"]
    children = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    best = yaml.safe_load(export.stdout)
    assert best["max_lr"] == pytest.approx(float(parent.data.params["best.max_lr"]))


def test_wrong_or_missing_login_is_one_line_before_the_range_test(server, tmp_path):
    """A search with a wrong password, an export with no login: exit 2, one line naming what to set."""
    job = _job_file(tmp_path, server["url"], "refused")
    search = _lrsearch("search", str(job), env=joined(_env(**_login("wrong-password-1"))), cwd=tmp_path)
    export = _lrsearch("export", "--experiment", "auth-authed", "--tracking-uri", server["url"], env=_env(),
                       cwd=tmp_path)
    for result, fragment in ((search, "rejected the credentials"), (export, "none was sent")):
        assert result.returncode == 2, result.stderr[-3000:]
        (line,) = result.stderr.strip().splitlines()
        assert "Traceback" not in result.stderr
        assert fragment in line and all(var in line for var in LOGIN_VARS), line
        assert "wrong-password-1" not in result.stdout + result.stderr
    assert not (tmp_path / "runs" / "refused" / "range_test.json").exists()  # nothing ran
    assert not (tmp_path / "runs" / "refused" / "tune").exists()


def _holds_secret(path: Path) -> bool:
    data = path.read_bytes()
    return any(s.encode() in data for s in SECRETS)


def test_no_credential_in_output_runs_artifacts_or_results(searched, server, monkeypatch, tmp_path):
    for proc in (searched["search"], searched["export"]):
        assert not any(s in proc.stdout + proc.stderr for s in SECRETS)
    client = _client(monkeypatch, server["url"])
    exp = client.get_experiment_by_name("auth-authed")
    downloaded = tmp_path / "artifacts"
    for run in client.search_runs([exp.experiment_id]):
        logged = json.dumps([run.data.params, run.data.tags, dict(run.info)], default=str)
        assert not any(s in logged for s in SECRETS), run.info.run_id
        client.download_artifacts(run.info.run_id, "", str(downloaded / run.info.run_id))
    files = [p for p in downloaded.rglob("*") if p.is_file()]
    assert {"job.yaml", "best_config.yaml", "trials.parquet", "summary.json"} <= {p.name for p in files}
    assert [p for p in files if _holds_secret(p)] == []
    results = [p for p in searched["results"].rglob("*") if p.is_file()]
    assert len(results) > 10 and [p for p in results if _holds_secret(p)] == []
    assert json.loads((searched["results"] / "mlflow.json").read_text())["uri"] == server["url"]


def test_credentials_in_the_uri_work_and_are_never_shown(searched, server, tmp_path):
    uri = server["url"].replace("://", f"://{USER}:{PASSWORD}@")
    result = _lrsearch("export", "--experiment", "auth-authed", "--tracking-uri", uri, env=_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_lr" in result.stdout and PASSWORD not in result.stdout + result.stderr


def test_submit_sends_no_mlflow_credentials(tmp_path, monkeypatch):
    """What ``lrsearch submit`` hands Ray's job client (runtime env, metadata, entrypoint, the
    shipped job file) holds no MLflow credential, though the submitter has one in its environment
    and in its job's tracking URI. The job client is a recorder here: a real cluster is
    tests/infra/test_multinode.py's."""
    import lrsearch.infra.jobs as jobs

    sent = {}

    class Recorder:
        def get_job_info(self, sub_id):
            raise RuntimeError("no such job")

        def submit_job(self, **kwargs):
            shipped = Path(kwargs["runtime_env"]["working_dir"])
            sent.update(kwargs, shipped={p.name: p.read_text() for p in shipped.rglob("*") if p.is_file()})

    monkeypatch.setattr(jobs, "_client", lambda address: Recorder())
    for var, value in _login().items():
        monkeypatch.setenv(var, value)
    job = _job_file(tmp_path, f"http://{USER}:{PASSWORD}@mlflow.internal:5000", "submitted")
    info = jobs.submit(job, "http://127.0.0.1:8265")
    assert sent["runtime_env"]["env_vars"] == {"LRSEARCH_SUBMISSION_ID": info["submission_id"]}
    assert yaml.safe_load(sent["shipped"]["job.yaml"])["tracking"]["uri"] == "http://mlflow.internal:5000"
    everything = json.dumps({"sent": sent, "info": info}, default=str)
    assert not any(s in everything for s in SECRETS) and USER not in everything


# --------------------------------------------------------------------------------------------
# The MLflow UI behind its login, seen in headless Chromium
# --------------------------------------------------------------------------------------------


async def _devtools_text(port: int, url: str, headers: dict[str, str], until: tuple[str, ...]) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = itertools.count(1)

            async def call(method: str, **params):
                call_id = next(ids)
                await ws.send_json({"id": call_id, "method": method, "params": params})
                async for msg in ws:  # events come in between; wait for this call's answer
                    answer = msg.json()
                    if answer.get("id") == call_id:
                        return answer.get("result", {})

            await call("Network.enable")
            await call("Network.setExtraHTTPHeaders", headers=headers)
            await call("Page.navigate", url=url)
            text, deadline = "", time.monotonic() + 180  # the UI fetches runs from a busy server
            while time.monotonic() < deadline and not all(t in text for t in until):
                await asyncio.sleep(1)
                done = await call("Runtime.evaluate", returnByValue=True,
                                  expression="document.body ? document.body.innerText : ''")
                text = done["result"].get("value") or ""
            return text


def _chromium_text(url: str, profile: Path, until: tuple[str, ...], headers: dict[str, str]) -> str:
    """The rendered text of ``url`` in headless Chromium, sending ``headers`` with every request
    (the page's own fetches too), set through the DevTools protocol: Chromium refuses the page's
    fetches when the URL itself carries ``user:password@``."""
    active = profile / "DevToolsActivePort"  # Chromium writes its port here
    active.unlink(missing_ok=True)  # a profile's earlier Chromium left its own
    proc = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1400,900", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (active.is_file() and active.read_text().strip()):
            assert time.time() < deadline and proc.poll() is None, "Chromium did not start"
            time.sleep(0.2)
        port = int(active.read_text().split()[0])
        return asyncio.run(_devtools_text(port, url, headers, until))
    finally:
        stop_group(proc)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
def test_mlflow_ui_after_login_shows_parent_and_child_runs(searched, server, monkeypatch, tmp_path):
    import base64

    client = _client(monkeypatch, server["url"])
    exp = client.get_experiment_by_name("auth-authed")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("lrsearch.role") == "search")
    child = next(r for r in runs if r.data.tags.get("lrsearch.role") == "trial")
    base = f"{server['url']}/#/experiments/{exp.experiment_id}"
    login = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    # logged in: the search's parent run, with its trials nested under it
    expected = (parent.info.run_name, f"{len(runs)} matching runs", USER)  # USER: who the UI says is logged in
    page = _chromium_text(f"{base}/runs", tmp_path / "chrome", expected, headers=login)
    assert all(t in page for t in expected), [t for t in expected if t not in page]
    # a trial's run, under its parent
    expected = (child.info.run_name, "Parent run", parent.info.run_name, "val_accuracy")
    page = _chromium_text(f"{base}/runs/{child.info.run_id}", tmp_path / "chrome", expected, headers=login)
    assert all(t in page for t in expected), [t for t in expected if t not in page]
