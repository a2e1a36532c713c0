"""Does a longer range test point at the LR a long run needs?

lrsearch's range test (``range_test.num_steps: auto``) is 5 % of the trials' most optimizer steps,
capped at 100. In the long regime of ``bench/search_quality.py`` (400 steps per epoch, 3-epoch
trials: 1200 steps) the cap decides: a 100-step sweep reads stability over a twelfth of one trial,
and the search's best trials there sat up to 9x below the LR it seeds the search with. This runs
only the range test, through the public API (``lrsearch.find_lr`` on the benchmark's own long
jobs), at 100 steps (as shipped) and at 840 steps (5 % with no cap: ``lrsearch_rt5pct``), on
several seeds, and sets each beside where trials of the full 3-epoch length scored best: the
``grid`` oracle's records and every completed trial of the long searches recorded under
``bench/results/search_quality/``.

The seed point is what lrsearch trains first: the geometric mean of the suggestions / 3, clipped
into the bounds (``lrsearch/tuning/setup.py``).

    .venv/bin/python bench/range_test_horizon.py [--tasks text,image,digits] [--seeds 5] [--steps 100,840]

Each (task, seed, steps) result is a JSON file under ``bench/results/range_test_horizon/``
(committed; a rerun skips what is there); the report goes to stdout and
``bench/results/range_test_horizon.md``. Time on 2 cores: one 840-step test takes about 1 min on
digits and image and about 4 min on text; the default run about 35 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_quality as sq  # noqa: E402  (the benchmark's long jobs and records)

import lrsearch  # noqa: E402

OUT = sq.RESULTS / "range_test_horizon"
THREADS = 2


def seed_point(suggestions: dict[str, float | None], bounds: tuple[float, float]) -> float:
    s = [v for v in suggestions.values() if v]
    low, high = bounds
    guess = math.exp(sum(math.log(v) for v in s) / len(s)) / 3 if s else math.sqrt(low * high)
    return min(max(guess, low), high)


def run(task: str, seed: int, steps: int) -> dict[str, Any]:
    path = OUT / f"long-{task}-s{seed}-{steps}.json"
    if path.is_file():
        return json.loads(path.read_text())
    job = sq.make_job("long", task, "lrsearch", seed, 18.0)
    job["range_test"] = {"num_steps": steps}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lrrth-") as storage:  # save=False: nothing stays there
        result = lrsearch.find_lr({**job, "storage": {"path": storage}}, save=False)
    suggestions, bounds = result.suggestions(), result.bounds()
    record = {"task": task, "seed": seed, "num_steps": steps, "steps_run": len(result.lrs),
              "stop_reason": result.stop_reason, "suggestions": suggestions, "bounds": list(bounds),
              "seed_point": seed_point(suggestions, bounds),
              "seconds": round(time.perf_counter() - started, 1),
              "lrsearch_version": lrsearch.__version__}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return record


def long_trials(task: str) -> list[tuple[float, float, str]]:
    """(max_lr, final accuracy, method) of every completed 3-epoch trial recorded for long ``task``."""
    out = []
    for path in sorted(sq.CACHE.glob(f"long-{task}-*.json")):
        data = json.loads(path.read_text())
        for t in data["trials"]:
            if t["state"] == "completed" and t["max_lr"] and t["metric_per_epoch"]:
                out.append((t["max_lr"], t["metric_per_epoch"][-1], data["method"]))
    return out


def median(values: list[float]) -> float:
    v = sorted(values)
    return math.exp((math.log(v[(len(v) - 1) // 2]) + math.log(v[len(v) // 2])) / 2)


def report(records: list[dict[str, Any]], tasks: list[str], steps: list[int]) -> str:
    out = ["# Range test length vs. where 3-epoch long-regime trials score best\n",
           "Per task and range-test length: over seeds, the steps run (the test stops where the "
           "loss diverges), the median seed point (lrsearch's first trial) and its range, the "
           "median bounds. Then the recorded 3-epoch trials: the LRs of the top decile by "
           "validation accuracy, and the grid oracle's best.\n"]
    for task in tasks:
        mine = [r for r in records if r["task"] == task]
        if not mine:
            continue
        out.append(f"## long {task}\n")
        out.append("| range test | seeds | steps run | seed point median (min..max) | bounds low (median) "
                   "| bounds high (median) | s per test |")
        out.append("|---|---|---|---|---|---|---|")
        for n in steps:
            rs = [r for r in mine if r["num_steps"] == n]
            if not rs:
                continue
            sp = [r["seed_point"] for r in rs]
            out.append(f"| {n} steps | {len(rs)} | {min(r['steps_run'] for r in rs)}-"
                       f"{max(r['steps_run'] for r in rs)} | {median(sp):.2g} ({min(sp):.2g}..{max(sp):.2g}) "
                       f"| {median([r['bounds'][0] for r in rs]):.2g} | {median([r['bounds'][1] for r in rs]):.2g} "
                       f"| {sorted(r['seconds'] for r in rs)[len(rs) // 2]:.0f} |")
        trials = long_trials(task)
        if trials:
            ranked = sorted(trials, key=lambda t: -t[1])
            top = ranked[:max(3, len(ranked) // 10)]
            lrs = [t[0] for t in top]
            out.append(f"\nRecorded completed 3-epoch trials: {len(trials)}; the top {len(top)} "
                       f"(accuracy {top[-1][1]:.3f}..{top[0][1]:.3f}) trained at max_lr "
                       f"{min(lrs):.2g}..{max(lrs):.2g}, median {median(lrs):.2g}.")
            grid = [t for t in trials if t[2] == "grid"]
            if grid:
                g = max(grid, key=lambda t: t[1])
                out.append(f"The grid's best (family default schedule, seed 0): {g[0]:.2g} at {g[1]:.3f}.")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="text,image,digits")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", default="100,840", help="comma list of range-test lengths")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    bad = [t for t in tasks if t not in sq.TASKS["long"]]
    if bad or args.seeds < 1 or any(s < 2 for s in steps):
        p.error(f"--tasks: one of text,image,digits (got {bad}); --seeds >= 1; --steps >= 2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(THREADS)
    records = []
    for task in tasks:
        for seed in range(args.seeds):
            for n in steps:
                path = OUT / f"long-{task}-s{seed}-{n}.json"
                if args.report_only and not path.is_file():
                    continue
                r = run(task, seed, n)
                records.append(r)
                print(f"long {task} seed {seed} {n} steps: ran {r['steps_run']} ({r['stop_reason']}), "
                      f"seed point {r['seed_point']:.2g}, bounds {r['bounds'][0]:.2g}..{r['bounds'][1]:.2g}, "
                      f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)
    text = report(records, tasks, steps)
    (sq.RESULTS / "range_test_horizon.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
