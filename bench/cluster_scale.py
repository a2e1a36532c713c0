"""200 trials of a trivial task on a 3-node Ray cluster on 127.0.0.1 (token authentication on):
a head with no CPUs for trials and two 1-CPU workers, as `lrsearch.infra.cluster` starts them.

Reports the search's wall time, per-trial overhead and where the trials ran. Run it on an
otherwise idle machine; it starts and stops its own cluster.

    .venv/bin/python bench/cluster_scale.py [--trials 200]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lrsearch.infra.cluster import head_command, worker_command

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes(env: dict[str, str], gcs: str) -> int:
    """How many nodes the cluster at ``gcs`` counts alive (0 while it cannot be joined)."""
    code = f"import ray; ray.init(address='{gcs}', log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


def search(gcs: str, num_trials: int, work: str) -> None:
    """In the driver process: one search on the cluster; prints its figures."""
    import lrsearch

    start = time.perf_counter()
    res = lrsearch.search({
        "name": "cluster-scale",
        "task": {"kind": "synthetic", "num_train": 64, "num_val": 64, "batch_size": 64, "hidden": 32},
        "range_test": {"enabled": False},
        "search": {"num_trials": num_trials, "max_epochs": 1, "max_concurrent_trials": 2,
                   "checkpoint": "none", "keep_checkpoints": "none"},
        "storage": {"path": f"{work}/runs"},
    }, address=gcs, track=False)
    wall = time.perf_counter() - start
    nodes = {t.node_id for t in res.trials}
    print("RESULT" + json.dumps({"trials": len(res.trials), "completed": res.counts["completed"],
                                 "wall_s": wall, "nodes": len(nodes)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lrsearch-cluster-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), PATH=f"{BIN}:{env['PATH']}",
               HOME=str(tmp))
    port = free_port()
    gcs, procs = f"127.0.0.1:{port}", []
    try:
        for i, argv in enumerate([head_command(port=port, dashboard_port=free_port(), num_cpus=0),
                                  worker_command(address=gcs, num_cpus=1),
                                  worker_command(address=gcs, num_cpus=1)]):
            procs.append(subprocess.Popen([str(BIN / argv[0]), *argv[1:]], env=env, start_new_session=True,
                                          stdout=(tmp / f"node{i}.log").open("w"), stderr=subprocess.STDOUT))
            deadline = time.time() + 240
            while alive_nodes(env, gcs) < i + 1:  # one node at a time (they share a session directory)
                assert time.time() < deadline, (tmp / f"node{i}.log").read_text()[-2000:]
                time.sleep(2)
        results = {}
        for n in (10, args.trials):
            code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import cluster_scale; "
                    f"cluster_scale.search({gcs!r}, {n}, {str(tmp)!r} + '/{n}')")
            done = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONWARNINGS": "ignore"},
                                  capture_output=True, text=True, cwd=tmp)
            line = [s for s in done.stdout.splitlines() if s.startswith("RESULT")]
            if not line:
                raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
            results[n] = json.loads(line[-1][6:])
            print(json.dumps(results[n]), flush=True)
        a, b = results[10], results[args.trials]
        marginal = (b["wall_s"] - a["wall_s"]) / (b["trials"] - a["trials"])
        print(f"\n| trials | completed | wall s | nodes that ran trials | marginal s/trial |\n|---|---|---|---|---|\n"
              f"| 10 | {a['completed']} | {a['wall_s']:.1f} | {a['nodes']} | - |\n"
              f"| {b['trials']} | {b['completed']} | {b['wall_s']:.1f} | {b['nodes']} | {marginal:.3f} |")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and str(port) in current.read_text():
            current.unlink()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
