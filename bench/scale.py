"""How lrsearch's bookkeeping grows with the number of trials, and what it costs next to training.

Each point is one search, in a fresh process (so driver memory is that search's own), of a trivial
task (the synthetic MLP, one optimizer step per epoch, one epoch per trial: nearly all of a trial
is bookkeeping) through the public API, two trials at a time on a local Ray. Reported per point:

- wall time, and the per-trial overhead: (wall - fixed start) / trials, where the fixed start
  (Ray start, range test, first trial) is measured by a 1-trial search in the same run;
- the marginal cost per trial between consecutive points (flat = no growth with the trial count);
- the driver's peak memory (ru_maxrss), MLflow logging time (the same search with and without
  tracking), and the sizes of trials.parquet, optuna.db and Ray Tune's experiment state;
- with ``--long``: the fraction of wall time that is not training for trials of ~30 s;
- with ``--second-trials N``: N trials of a few seconds of training each (2.5 s on this machine,
  two at a time), with the default checkpoints, and the wall time beyond training (Ray Tune's
  published +14 % is for 10,000 trials of 1 s).

    .venv/bin/python bench/scale.py [--trials 10,100,1000] [--tracking none,sqlite,postgres]
        [--policies defaults,none] [--baseline PATH] [--long] [--second-trials N]

``--policies``: ``defaults`` runs the job's default checkpoint policies (``search.checkpoint:
rungs``, ``keep_checkpoints: best``: every trial saves its final weights), ``none`` turns both off
(bookkeeping without checkpoints). ``--baseline PATH``: the same rows also with the lrsearch of
another checkout (``git worktree add /tmp/base COMMIT``), side by side in one run.

PostgreSQL needs a local server (``scripts/setup.sh`` installs it); the script starts its own
cluster in a temporary directory on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def one_search(num_trials: int, uri: str | None, work: str, train_steps: int,
               policy: str = "none", algorithm: str = "tpe") -> dict:
    """Run in a child process: one search; prints its figures as JSON."""
    import lrsearch

    checkpoints = {"checkpoint": "none", "keep_checkpoints": "none"} if policy == "none" else {}
    job = {
        "name": f"scale-{num_trials}",
        "task": {"kind": "synthetic", "num_train": 64 * train_steps, "num_val": 64, "batch_size": 64,
                 "hidden": 32 if train_steps == 1 else 1024},
        "range_test": {"enabled": False},
        "search": {"algorithm": algorithm, "num_trials": num_trials, "max_epochs": 1, "grace_period": 1, "max_concurrent_trials": 2,
                   **checkpoints},
        "storage": {"path": f"{work}/runs"},
        "tracking": {"uri": uri},
    }
    start = time.perf_counter()
    res = lrsearch.search(job, track=uri is not None)
    wall = time.perf_counter() - start
    out = Path(res.paths["results"])
    starts = sorted(json.loads(f.open().readline())["epoch_started_at"] for f in (out / "tune").glob("*/result.json"))
    return {
        # seconds per hundred trials started, early (trials 100-200) and late (the last hundred)
        "per100_early_s": starts[200] - starts[100] if len(starts) > 200 else None,
        "per100_late_s": starts[-1] - starts[-101] if len(starts) > 300 else None,
        "trials": num_trials, "wall_s": wall, "completed": res.counts["completed"],
        "train_s": sum(t.train_seconds for t in res.trials),
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parquet_kb": _size(out / "trials.parquet") / 1024, "optuna_db_kb": _size(out / "optuna.db") / 1024,
        "tune_state_kb": sum(_size(p) for p in (out / "tune").glob("*.json")) / 1024
                         + sum(_size(p) for p in (out / "tune").glob("*.pkl")) / 1024,
    }


def _child(num_trials: int, uri: str | None, train_steps: int, policy: str = "none",
           src: str | None = None, algorithm: str = "tpe") -> dict:
    work = tempfile.mkdtemp(prefix="lrsearch-scale-")
    try:
        code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import scale; "
                f"print('RESULT' + json.dumps(scale.one_search({num_trials}, {uri!r}, {work!r}, "
                f"{train_steps}, {policy!r}, {algorithm!r})))")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        if src:  # that checkout's lrsearch, in the driver and in the Ray workers it starts
            env["PYTHONPATH"] = src
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env)
        line = [s for s in done.stdout.splitlines() if s.startswith("RESULT")]
        if not line:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        return json.loads(line[-1][6:])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _postgres() -> tuple[str, callable]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (as the tests start one)."""
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    data = Path(tempfile.mkdtemp(prefix="lrsearch-pg-"))
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if user:
        shutil.chown(data, "postgres")
    subprocess.run([*user, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "mlflow"],
                   check=True, capture_output=True)
    port = 55432
    subprocess.run([*user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-o",
                    f"-p {port} -k {data} -h 127.0.0.1", "-w", "start"], check=True, capture_output=True)
    subprocess.run([*user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                   check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([*user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)

    return f"postgresql://mlflow@127.0.0.1:{port}/mlflow", stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", default="10,100,1000")
    ap.add_argument("--tracking", default="none,sqlite", help="none, sqlite, postgres (comma-separated)")
    ap.add_argument("--policies", default="defaults,none", help="checkpoint policies: defaults, none")
    ap.add_argument("--algorithms", default="tpe", help="search.algorithm: tpe, random (comma-separated)")
    ap.add_argument("--baseline", default=None, help="a checkout of another lrsearch: its rows too")
    ap.add_argument("--long", action="store_true", help="also: 6 trials of ~30 s, bookkeeping fraction")
    ap.add_argument("--second-trials", type=int, default=0,
                    help="also: N trials of a few seconds of training each (2.5 s here), the default "
                         "checkpoints, and the wall time beyond training (Ray Tune's benchmark: 10k trials of 1 s)")
    args = ap.parse_args()
    counts = [int(n) for n in args.trials.split(",")]
    sources = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    for backend in args.tracking.split(","):
        stop = None
        if backend == "postgres":
            uri, stop = _postgres()
        else:
            uri = None if backend == "none" else "sqlite:///mlruns.db"
        try:
            for algorithm in args.algorithms.split(","):
                for policy in args.policies.split(","):
                    for label, src in sources:
                        base = _child(1, uri, 1, policy, src, algorithm)
                        for n in counts:
                            r = _child(n, uri, 1, policy, src, algorithm)
                            r.update(backend=backend, policy=policy, code=label, fixed_s=base["wall_s"],
                                     algorithm=algorithm)
                            rows.append(r)
                            print(json.dumps(r), flush=True)
        finally:
            if stop:
                stop()
    print("\n| code | algorithm | tracking | checkpoints | trials | wall s | per-trial overhead s | marginal s/trial | "
          "s per 100 trials: 100-200, last 100 | driver peak MB | trials.parquet KB | optuna.db KB | Tune state KB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    prev = {}
    for r in rows:
        key = (r["code"], r["algorithm"], r["backend"], r["policy"])
        over = (r["wall_s"] - r["fixed_s"]) / max(1, r["trials"] - 1)
        p = prev.get(key)
        marginal = "-" if p is None else f"{(r['wall_s'] - p['wall_s']) / (r['trials'] - p['trials']):.3f}"
        prev[key] = r
        per100 = "-" if r["per100_late_s"] is None else (
            f"{r['per100_early_s']:.1f}, {r['per100_late_s']:.1f} ({r['per100_late_s'] / r['per100_early_s']:.2f}x)")
        print(f"| {r['code']} | {r['algorithm']} | {r['backend']} | {r['policy']} | {r['trials']} | {r['wall_s']:.1f} | "
              f"{over:.3f} | {marginal} | {per100} | {r['driver_peak_mb']:.0f} | {r['parquet_kb']:.0f} | {r['optuna_db_kb']:.0f} | "
              f"{r['tune_state_kb']:.0f} |")
    if args.second_trials:
        # 83 steps of the 1024-wide MLP: 2.46 s per trial here with two at a time (12 ms a step alone)
        n, steps = args.second_trials, 83
        base, r = _child(1, None, steps, "defaults"), _child(n, None, steps, "defaults")
        ideal = r["train_s"] / 2  # two trials at a time, nothing but training
        r.update(kind="second_trials", fixed_s=base["wall_s"])
        print(json.dumps(r), flush=True)
        print(f"\n{n} trials of {r['train_s'] / n:.2f} s of training each, two at a time: wall {r['wall_s']:.1f} s, "
              f"fixed start {base['wall_s']:.1f} s; bookkeeping beyond training: "
              f"{(r['wall_s'] - base['wall_s']) / ideal - 1:+.1%} without the fixed start, "
              f"{r['wall_s'] / ideal - 1:+.1%} with it")
    if args.long:
        r = _child(6, None, 2500)  # ~30 s of training per trial on one core here
        busy = r["train_s"] / 2  # two trials at a time
        print(f"\nlong trials: 6 trials, {r['train_s'] / 6:.1f} s of training each, wall {r['wall_s']:.1f} s; "
              f"not training: {(r['wall_s'] - busy) / r['wall_s']:.1%} of wall time "
              f"(of which the fixed start, Ray and the task: {base['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
