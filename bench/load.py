"""Many searches at once on one Ray cluster on 127.0.0.1 (token authentication on): a head with no
CPUs for trials and two 1-CPU workers, as `lrsearch.infra.cluster` starts them.

First one search alone, then six `lrsearch submit` at the same moment: four searches, one of them
twice (attaches to the first), and one whose trials ask for more CPUs than any node has (refused
at submit). Unless --no-kill, worker node B is killed once the six are training, as in
tests/infra/test_load.py. Prints a markdown table: wall time, time each search was queued (submitted ->
driver started -> first trial running), per trial: training time and overhead (the trainable's
time minus its training: setup, evaluation, checkpoints, logging) and the gap between a search's
trials (Ray scheduling a new trial actor, waiting for a free CPU);
writes the JSON record to bench/results/load/. Public CLI and output files only (`lrsearch submit`,
`lrsearch jobs list/status --json`, trials.parquet, the MLflow store).

    .venv/bin/python bench/load.py [--no-kill] [--trials 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from cluster_scale import alive_nodes, free_port  # bench/: the cluster helpers of the scale bench
from mlflow import MlflowClient

from lrsearch.infra.cluster import head_command, worker_command

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent / "results" / "load"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _job(tmp: Path, name: str, *, trials: int, epochs: int, cpu: float = 1, seed: int = 0) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "task": {"kind": "synthetic", "num_train": 1024, "num_val": 256, "batch_size": 64, "hidden": 64},
        "range_test": {"num_steps": 10},
        "search": {"num_trials": trials, "max_epochs": epochs, "grace_period": epochs, "max_concurrent_trials": 1,
                   "max_failures": 3, "checkpoint": "epoch", "seed": seed,
                   "budget": {"trial_epochs": 4 * trials * epochs}},
        "resources": {"cpu": cpu},
        "storage": {"path": str(tmp / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp}/mlruns.db", "experiment": name},
    }))
    return path


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lrsearch"), *args], env=env, capture_output=True, text=True, timeout=600)


def _submit_at_once(env: dict[str, str], address: str, paths: list[Path]) -> list[dict]:
    procs = [(p, subprocess.Popen([str(BIN / "lrsearch"), "submit", str(p), "--address", address, "--json"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for p in paths]
    out = []
    for path, proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        out.append({"job_file": path.name, "exit_code": proc.returncode,
                    "info": json.loads(stdout) if proc.returncode == 0 else None,
                    "error": stderr.strip().splitlines()[-1] if proc.returncode else None})
    return out


def _wait(env: dict[str, str], address: str, ids: list[str], kill=None) -> dict[str, str]:
    """Poll `lrsearch jobs list --json` until every job ends; ``kill()`` once trials are training."""
    while True:
        listed = {j["submission_id"]: j for j in json.loads(_cli(env, "jobs", "list", "--address", address,
                                                                  "--json").stdout)["jobs"]}
        states = {s: listed[s]["status"] for s in ids}
        if kill is not None and kill():
            kill = None
        if all(v in TERMINAL for v in states.values()):
            return states
        time.sleep(3)


def _span(trial_dir: Path) -> tuple[float, float]:
    """When a trial's trainable ran (its actor had a CPU): Ray Tune's last result, minus its total time."""
    last = json.loads((trial_dir / "result.json").read_text().strip().splitlines()[-1])
    return last["timestamp"] - last["time_total_s"], float(last["timestamp"])


def _figures(env: dict[str, str], address: str, tmp: Path, name: str, sub_id: str) -> dict:
    """One search's timeline (seconds since its submission) and per-trial figures."""
    status = json.loads(_cli(env, "jobs", "status", sub_id, "--address", address, "--json").stdout)
    submitted, ended = status["start_time"] / 1000, status["end_time"] / 1000
    client = MlflowClient(f"sqlite:///{tmp}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("lrsearch.role") == "search")
    children = [r for r in runs if r.data.tags.get("lrsearch.role") == "trial"]
    trials = pq.read_table(tmp / "runs" / name / "trials.parquet").to_pylist()
    spans = sorted(_span(Path(t["path"])) for t in trials)
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:], strict=False)]  # max_concurrent_trials 1: one after another
    return {"job": name, "submission_id": sub_id, "status": status["status"],
            "progress": status["progress"],
            "driver_started_s": parent.info.start_time / 1000 - submitted,
            "first_trial_started_s": spans[0][0] - submitted if spans else None,
            "wall_s": ended - submitted,
            "trial_wall_s": [t["wall_seconds"] for t in trials],
            "trial_train_s": [t["train_seconds"] for t in trials],
            "trial_overhead_s": [t["wall_seconds"] - t["train_seconds"] for t in trials],
            "gap_between_trials_s": gaps,
            "trial_states": [t["state"] for t in trials], "mlflow_children": len(children),
            "nodes": len({t["node_id"] for t in trials})}


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _row(label: str, searches: list[dict], wall: float) -> str:
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    drv = [s["driver_started_s"] for s in searches]
    first = [s["first_trial_started_s"] for s in searches if s["first_trial_started_s"] is not None]
    over = [x for s in searches for x in s["trial_overhead_s"]]
    train = [x for s in searches for x in s["trial_train_s"]]
    gaps = [x for s in searches for x in s["gap_between_trials_s"]]
    return (f"| {label} | {len(searches)} | {f(wall)} | {f(_mean(drv))} / {f(max(drv))} | "
            f"{f(_mean(first))} / {f(max(first) if first else None)} | {f(_mean(train))} | {f(_mean(over))} | "
            f"{f(_mean(gaps))} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-kill", action="store_true", help="keep both workers during the six")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lrsearch-load-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    token = secrets.token_hex(24)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{env['PATH']}", HOME=str(tmp),
               PYTHONWARNINGS="ignore")
    port, dash = free_port(), free_port()
    gcs, address, procs = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", []
    # apart from other Rays on the machine: the agent's default port may be taken, and a job's driver
    # joins the cluster "auto" finds in the head's temp dir (/tmp/ray: whoever started last)
    ray_tmp = Path(tempfile.mkdtemp(prefix="lrl-", dir="/tmp"))
    head = [*head_command(port=port, dashboard_port=dash, num_cpus=0), f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={ray_tmp}"]
    try:
        for i, argv in enumerate([head,
                                  worker_command(address=gcs, num_cpus=1),
                                  worker_command(address=gcs, num_cpus=1)]):
            procs.append(subprocess.Popen([str(BIN / argv[0]), *argv[1:]], env=env, start_new_session=True,
                                          stdout=(tmp / f"node{i}.log").open("w"), stderr=subprocess.STDOUT))
            deadline = time.time() + 300
            while alive_nodes(env, gcs) < i + 1:  # one node at a time (they share a session directory)
                if time.time() > deadline:
                    raise RuntimeError((tmp / f"node{i}.log").read_text()[-2000:])
                time.sleep(2)
        MlflowClient(f"sqlite:///{tmp}/mlruns.db").search_experiments()  # the store exists before the drivers
        size = {"trials": args.trials, "epochs": args.epochs}

        # one search alone on the full cluster
        t0 = time.time()
        solo = _submit_at_once(env, address, [_job(tmp, "solo", **size)])[0]
        _wait(env, address, [solo["info"]["submission_id"]])
        solo_wall = time.time() - t0
        alone = [_figures(env, address, tmp, "solo", solo["info"]["submission_id"])]

        # six at once: four searches, load-a twice, one over-ask
        names = ["load-a", "load-b", "load-c", "load-d"]
        paths = {n: _job(tmp, n, seed=i + 1, **size) for i, n in enumerate(names)}
        order = [paths["load-a"], paths["load-b"], paths["load-a"], paths["load-c"],
                 _job(tmp, "load-big", cpu=4, **size), paths["load-d"]]
        t0 = time.time()
        submitted = _submit_at_once(env, address, order)
        submit_s = time.time() - t0
        ids = {s["info"]["submission_id"]: s["job_file"][:-5] for s in submitted if s["info"]}

        killed_at = []

        def kill() -> bool:
            if args.no_kill or not list((tmp / "runs").glob("load-*/tune/*/checkpoint_*")):
                return args.no_kill
            os.killpg(procs[2].pid, signal.SIGKILL)
            killed_at.append(time.time() - t0)
            return True

        states = _wait(env, address, list(ids), kill)
        six_wall = time.time() - t0
        at_once = [_figures(env, address, tmp, name, sub_id) for sub_id, name in ids.items()]

        record = {
            "bench": "load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                        "python": platform.python_version()},
            "cluster": "head 0 CPU + 2 workers x 1 CPU, 127.0.0.1, token auth",
            "size": {**size, "max_concurrent_trials": 1, "task": "synthetic 1024 train / 256 val, hidden 64"},
            "worker_killed_at_s": killed_at[0] if killed_at else None,
            "alone": {"wall_s": solo_wall, "searches": alone},
            "six_at_once": {"wall_s": six_wall, "submit_all_s": submit_s, "states": states,
                            "submits": submitted, "searches": at_once},
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"load-{datetime.now():%Y-%m-%d-%H%M%S}{'-nokill' if args.no_kill else ''}.json"
        out.write_text(json.dumps(record, indent=1))
        kill_note = (f"; worker B killed at {killed_at[0]:.0f} s" if killed_at else "")
        print(f"\nsize: {args.trials} trials x {args.epochs} epochs per search, max_concurrent_trials 1; "
              f"2 x 1-CPU workers{kill_note}; load avg at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("\n| run | searches | wall s | submitted -> driver started s (mean / max) | "
              "submitted -> first trial s (mean / max) | train s per trial | overhead s per trial | "
              "gap between a search's trials s |\n|---|---|---|---|---|---|---|---|")
        print(_row("1 alone", alone, solo_wall))
        print(_row("6 at once", at_once, six_wall))
        refused = [s for s in submitted if s["exit_code"] != 0]
        dup = [s["info"]["already_submitted"] for s in submitted if s["job_file"] == "load-a.yaml"]
        print(f"\nrefused at submit: {[s['error'] for s in refused]}\nload-a twice, already_submitted: {dup}; "
              f"states: {sorted(states.values())}\nrecord: {out}")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
