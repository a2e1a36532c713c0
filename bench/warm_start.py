"""Does ``search.warm_start`` let a new search reach an earlier one's best at a quarter of its compute?

Every search is one call of the public API, ``lrsearch.search(job_dict)``, tracked in a throwaway
MLflow store so that the later searches can warm-start from the earlier ones (no monkeypatching).
Tasks and the first searches are ``bench/search_quality.py``'s tiny regime, method ``lrsearch`` as
shipped (range test, TPE + ASHA, 3 epochs per trial, B = 18): ``digits`` (EfficientNet-Lite0 on
scikit-learn digits) and ``image`` (the same model on Fashion-MNIST). Per seed ``s``:

- ``first_digits`` and ``first_image``: the shipped search of each task, seed ``s``; the targets
  are their best validation accuracy, their compute is trial-epochs with the range test included.
- case (a), same task, another seed: digits with seed ``s + 10`` (search seed, data split, batch
  order, head init), ``warm``: ``search.warm_start: [first_digits]``; ``cold``: the same job without
  it. Target: ``first_digits``' best.
- case (b), related task (same model, other data): image, seed ``s``, ``warm`` from
  ``first_digits``; ``cold`` without. Target: ``first_image``'s best (a full search of that task).

The warm and cold searches are the same job but for ``warm_start``: ``NUM_TRIALS`` trials, no range
test, ``max_lr`` over the bounds ``first_digits``' range test found (what its summary prints; a
user reusing a search reuses them too), the rest as shipped. Compute is counted as in
``search_quality.py``: trials charged in creation order; a trial's value counts once it completed
its 3 epochs. Reported: the compute at which each search first reaches the target, and its ratio
to the first search's compute (goal: <= 1/4).

Usage::

    .venv/bin/python bench/warm_start.py               # 3 seeds (~30-40 min on 2 shared cores)
    .venv/bin/python bench/warm_start.py --seeds 1
    .venv/bin/python bench/warm_start.py --report-only

Records: one JSON file per search under ``bench/results/warm_start/`` (``{seed}-{search}.json``:
the job, every trial's number, state, epochs, metric per epoch, schedule and max_lr, the curve,
the warm-start report); a seed whose six records exist is skipped. The report goes to stdout and
``bench/results/warm_start.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import DRIVER_THREADS, curve, make_job, value_at  # noqa: E402

import lrsearch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "results" / "warm_start"
REPORT = ROOT / "bench" / "results" / "warm_start.md"
BUDGET = 18.0
NUM_TRIALS = 8  # warm and cold: ~14 trial-epochs under ASHA, about half the first search's
SEARCHES = ("first_digits", "first_image", "a_warm", "a_cold", "b_warm", "b_cold")


def first_job(task: str, seed: int, store: str) -> dict[str, Any]:
    job = make_job("tiny", task, "lrsearch", seed, BUDGET)
    job["name"] = f"ws-first-{task}-s{seed}"
    job["tracking"] = {"uri": f"sqlite:///{store}", "experiment": job["name"]}
    return job


def second_job(task: str, seed: int, store: str, bounds: list[float], warm_from: str | None) -> dict[str, Any]:
    job = make_job("tiny", task, "lrsearch", seed, BUDGET)
    job["name"] = f"ws-{task}-s{seed}-{'warm' if warm_from else 'cold'}"
    job["tracking"] = {"uri": f"sqlite:///{store}", "experiment": job["name"]}
    job["range_test"] = {"enabled": False}
    job["space"]["max_lr"] = {"low": bounds[0], "high": bounds[1], "log": True}
    job["search"]["num_trials"] = NUM_TRIALS
    if warm_from:
        job["search"]["warm_start"] = [warm_from]
    return job


def run(job: dict[str, Any], storage: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = lrsearch.search({**job, "storage": {"path": storage}}, show_progress=False)
    trials = [{"number": t.number, "state": t.state.value, "epochs": t.stopped_at_epoch,
               "metric_per_epoch": list(t.metric_per_epoch), "schedule": t.schedule, "max_lr": t.max_lr}
              for t in result.trials]
    start = float(result.range_test_epochs)
    points = curve(trials, start, result.mode)
    return {"job": job, "lrsearch_version": lrsearch.__version__, "metric": result.metric,
            "range_test_epochs": start, "bounds": result.range_test["bounds"] if result.range_test else None,
            "compute_total": start + result.trial_epochs, "curve": points,
            "best": points[-1][1] if points else None, "warm_start": result.warm_start,
            "seconds": round(time.perf_counter() - started, 1), "trials": trials}


def run_seed(seed: int) -> None:
    paths = {name: CACHE / f"s{seed}-{name}.json" for name in SEARCHES}
    if all(p.is_file() for p in paths.values()):
        return
    work = tempfile.mkdtemp(prefix="lrws-")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="lrws-ray-")
    store = f"{work}/mlruns.db"
    try:
        first = first_job("digits", seed, store)
        records = {"first_digits": run(first, work)}
        bounds = records["first_digits"]["bounds"]
        records["first_image"] = run(first_job("image", seed, store), work)
        for case, task, s in (("a", "digits", seed + 10), ("b", "image", seed)):
            for kind in ("warm", "cold"):
                job = second_job(task, s, store, bounds, first["name"] if kind == "warm" else None)
                records[f"{case}_{kind}"] = run(job, work)
                print(f"  seed {seed} {case}_{kind}: best {records[f'{case}_{kind}']['best']}", file=sys.stderr)
        for name, record in records.items():
            paths[name].write_text(json.dumps(record, separators=(",", ":")) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


def reach(record: dict[str, Any], target: float) -> float | None:
    """The compute at which ``record``'s best-so-far first reaches ``target``."""
    return next((c for c, v in record["curve"] if v >= target - 1e-9), None)


def fmt(x: float | None, digits: int = 3) -> str:
    if x == float("inf"):
        return "never"  # a median ratio over seeds of which at least half never reached the target
    return "-" if x is None else f"{x:.{digits}g}"


def report(seeds: list[int]) -> str:
    rows, summary = [], {}
    for case, target_name in (("a", "first_digits"), ("b", "first_image")):
        ratios = {"warm": [], "cold": []}
        at_quarter = {"warm": [], "cold": []}
        for seed in seeds:
            files = {n: CACHE / f"s{seed}-{n}.json" for n in SEARCHES}
            if not all(f.is_file() for f in files.values()):
                continue
            r = {n: json.loads(f.read_text()) for n, f in files.items()}
            first, target = r[target_name], r[target_name]["best"]
            quarter = first["compute_total"] / 4
            cells = []
            for kind in ("warm", "cold"):
                rec = r[f"{case}_{kind}"]
                got = reach(rec, target)
                ratios[kind].append(got / first["compute_total"] if got is not None else float("inf"))
                at_quarter[kind].append(value_at(rec["curve"], quarter))
                cells += [f"{fmt(got)} ({fmt(got / first['compute_total'], 2) if got else 'never'})",
                          f"{fmt(rec['best'])} / {fmt(value_at(rec['curve'], quarter))}"]
            ws = r[f"{case}_warm"]["warm_start"] or {"reused": 0, "dropped": 0}
            rows.append(f"| ({case}) | {seed} | {fmt(target)} | {first['compute_total']:.1f} | "
                        + " | ".join(cells) + f" | {ws['reused']} / {ws['dropped']} |")
        summary[case] = {k: (statistics.median(v) if v else None) for k, v in ratios.items()}
        summary[case].update({f"{k}_q": statistics.median([x or 0.0 for x in v]) if v else None
                              for k, v in at_quarter.items()})
    head = ("| case | seed | target | first's compute | warm: compute to target (ratio) | warm: best / at 1/4 "
            "| cold: compute to target (ratio) | cold: best / at 1/4 | seeded / dropped |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head, *rows, "", "| case | median ratio warm | median ratio cold | median best at 1/4 (0: none "
             "completed by then), warm | cold |",
             "|---|---|---|---|---|"]
    for case, m in summary.items():
        lines.append(f"| ({case}) | {fmt(m['warm'], 2)} | {fmt(m['cold'], 2)} | {fmt(m['warm_q'])} | {fmt(m['cold_q'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    if not args.report_only:
        import torch

        torch.set_num_threads(DRIVER_THREADS)
        CACHE.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            started = time.perf_counter()
            run_seed(seed)
            print(f"seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    text = report(seeds)
    REPORT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
