"""Where does the horizon bridge start to pay? ``lr_scales="auto"`` measured between 1x and 4x.

``lrsearch train`` (``lr_scales="auto"``) trains the config at 1x, 0.5x and 0.25x its ``max_lr``
and keeps the best by the final run's validation, once the final run has at least ``BRIDGE_AT``
times the optimizer steps the config was searched at: 2 when this was written, 4 since it measured
the bridge gaining nothing at 2x. ``bench/final_quality.py`` measured the
bridge at 4x only (``lrsearch_short_lrscale``). This trains the same configs (the best of each
``lrsearch_short`` search in ``bench/results/final_quality/``) at 2x a trial's optimizer steps (2x
its training data, the same 3 epochs), at each multiple, and scores each once on the same 1500
held-out test examples; the 4x rows come from the ``lrsearch_short_lrscale`` records.

Per (task, seed, horizon): the 1x run's test (what ``lr_scales=(1,)`` ships) against the test of
the candidate the final run's validation keeps (what the bridge ships), paired by seed.

Everything is a call of the public API (``lrsearch.train``). Each (task, seed, horizon) is one JSON
record under ``bench/results/bridge_horizon/`` (committed; a rerun skips what is there).

    .venv/bin/python bench/bridge_horizon.py [--tasks text,image] [--scales 2]
    .venv/bin/python bench/bridge_horizon.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import final_quality as fq  # noqa: E402  (the tasks, the final job and the searches' records)
import search_quality as sq  # noqa: E402

OUT = fq.ROOT / "bench" / "results" / "bridge_horizon"
REPORT = fq.ROOT / "bench" / "results" / "bridge_horizon.md"
MULTIPLES = (1.0, 0.5, 0.25)
BASE = "lrsearch_short"  # its best config: the one lrsearch_short_lrscale bridged at 4x


def run(task: str, seed: int, scale: int) -> dict[str, Any] | None:
    path = OUT / f"{task}-s{seed}-x{scale}.json"
    if path.is_file():
        return json.loads(path.read_text())
    base = fq.record_path(task, BASE, seed)
    if not base.is_file():
        return None
    best = json.loads(base.read_text())["finals"][0]["config"]
    job = fq.final_job(task, BASE, seed)
    job["task"] = {**job["task"], "num_train": scale * fq.TASKS[task]["num_train"]}
    job["name"] = f"bh-{task}-s{seed}-x{scale}"
    started = time.perf_counter()
    storage = tempfile.mkdtemp(prefix="lrbh-")
    try:
        finals = [dict(fq.final_run(job, {**best, "max_lr": best["max_lr"] * m}, os.path.join(storage, f"x{m:g}")),
                       lr_scale=m) for m in MULTIPLES]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    record = {"task": task, "seed": seed, "scale": scale, "base": base.name, "finals": finals,
              "seconds": round(time.perf_counter() - started, 1)}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return record


def rows(task: str, scale: int) -> dict[int, list[dict[str, Any]]]:
    """``{seed: finals at 1x, 0.5x, 0.25x}`` at this horizon (4x: the final-quality records)."""
    if scale == fq.SCALE:
        runs = fq.load().get((task, "lrsearch_short_lrscale"), {})
        return {s: r["finals"] for s, r in runs.items()}
    found = {}
    for path in sorted(OUT.glob(f"{task}-s*-x{scale}.json")):
        r = json.loads(path.read_text())
        if r["base"] == fq.record_path(task, BASE, r["seed"]).name:  # of this protocol only
            found[r["seed"]] = r["finals"]
    return found


def report(tasks: list[str], scales: list[int]) -> str:
    out = ["# The horizon bridge between 1x and 4x\n",
           f"The best config of each `{BASE}` search trained at {'x, '.join(map(str, scales))}x a trial's "
           f"optimizer steps (its data scaled, the same 3 epochs), at {', '.join(f'{m:g}x' for m in MULTIPLES)} "
           f"its max_lr, each scored once on {fq.NUM_TEST} held-out test examples. 'bridge' keeps the "
           "candidate with the best final validation (`lr_scales=\"auto\"`); '1x' is `lr_scales=(1,)`. "
           f"W/T/L: bridge against 1x, paired by seed (tie: within {fq.TIE}).\n",
           "| task | horizon | seeds | 1x: median test | bridge: median test | bridge - 1x: W/T/L, median (min..max) pts "
           "| kept 1x / 0.5x / 0.25x | best by test 1x / 0.5x / 0.25x |",
           "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for scale in sorted({*scales, fq.SCALE}):
            found = rows(task, scale)
            if not found:
                continue
            one = [f[0]["test_metric"] for f in found.values()]
            kept = [max(f, key=lambda x: x["val_metric"]) for f in found.values()]
            picked = [k["test_metric"] for k in kept]
            diffs = [b - a for a, b in zip(one, picked, strict=True)]
            wtl = f"{sum(d > fq.TIE for d in diffs)}/{sum(abs(d) <= fq.TIE for d in diffs)}/{sum(d < -fq.TIE for d in diffs)}"
            counts = [sum(k.get("lr_scale", 1.0) == m for k in kept) for m in MULTIPLES]
            best = [max(f, key=lambda x: x["test_metric"]).get("lr_scale", 1.0) for f in found.values()]
            out.append(f"| {task} | {scale}x | {len(found)} | {np.median(one):.3f} | {np.median(picked):.3f} | "
                       f"{wtl}, {100 * np.median(diffs):+.1f} ({100 * min(diffs):+.1f}..{100 * max(diffs):+.1f}) | "
                       f"{' / '.join(map(str, counts))} | {' / '.join(str(best.count(m)) for m in MULTIPLES)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="text,image")
    p.add_argument("--scales", default="2")
    p.add_argument("--seeds", type=int, default=9)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    tasks, scales = args.tasks.split(","), [int(x) for x in args.scales.split(",")]
    bad = [t for t in tasks if t not in fq.TASKS]
    if bad:
        p.error(f"--tasks: {bad[0]!r}; allowed: {', '.join(fq.TASKS)}")
    if not args.report_only:
        import ray
        import torch

        torch.set_num_threads(sq.DRIVER_THREADS)
        ray_tmp = tempfile.mkdtemp(prefix="lrbh-ray-")
        os.environ["RAY_TMPDIR"] = ray_tmp
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            for scale in scales:
                for seed in range(args.seeds):
                    for task in tasks:
                        record = run(task, seed, scale)
                        if record:
                            print(f"{task} s{seed} x{scale}: " + ", ".join(
                                f"{f['lr_scale']:g}x test {f['test_metric']:.3f} val {f['val_metric']:.3f}"
                                for f in record["finals"]), file=sys.stderr, flush=True)
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    text = report(tasks, scales)
    REPORT.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
