"""Range-test curves of ``bench/final_quality.py``'s searches, kept whole, to check the rules that read them.

For each task and seed this runs the range test the search runs (``lrsearch.find_lr`` on the
``lrsearch_short`` search job: same task, recipe, length and seed) and records its LRs, smoothed
and raw losses, stop reason, suggestions and bounds. The rules in
``lrsearch/range_test/suggestions.py`` are pure functions of such a curve, so a change to them can
be checked against every recorded curve without training again: ``--report-only`` rereads the
records with the installed lrsearch and prints, per curve, whether it shows a descent and its
bounds, beside the recorded ones.

    .venv/bin/python bench/range_test_curves.py [--tasks digits,image,text,text2] [--seeds 5] [--report-only]

Records: ``bench/results/range_test_curves/{task}-s{seed}.json`` (a rerun skips what is there).
Time on 2 cores: about 10 s a curve on digits and image, 30 s on text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import final_quality as fq  # noqa: E402  (the benchmark's tasks and search jobs)

import lrsearch  # noqa: E402
from lrsearch.range_test import RangeTestResult  # noqa: E402

CACHE = Path(__file__).resolve().parent / "results" / "range_test_curves"


def record(task_name: str, seed: int) -> dict:
    path = CACHE / f"{task_name}-s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    job = lrsearch.load_job(fq.search_job(task_name, "lrsearch_short", seed))
    start = time.time()
    result = lrsearch.find_lr(job, save=False)
    out = {"task": task_name, "seed": seed, "seconds": round(time.time() - start, 1),
           "lrsearch_version": lrsearch.__version__, **result.to_dict()}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def reread(rec: dict) -> RangeTestResult:
    return RangeTestResult(lrs=rec["lrs"], losses=rec["losses"], raw_losses=rec["raw_losses"],
                           stop_reason=rec["stop_reason"], diverged_lr=rec.get("diverged_lr"),
                           settings=rec.get("settings", {}))


def report(records: list[dict]) -> str:
    lines = ["# Range-test curves of final_quality's searches, reread with today's rules",
             "",
             "Per curve: its length, the bounds recorded when it ran, and with the installed lrsearch whether it "
             "shows a descent and its bounds (what the search draws `max_lr` from).",
             "",
             "| task | seed | steps | recorded bounds | descent now | bounds now |",
             "|---|---|---|---|---|---|"]
    for rec in records:
        r = reread(rec)
        b0, b1 = rec["bounds"], r.bounds()
        lines.append(f"| {rec['task']} | {rec['seed']} | {len(rec['lrs'])} | {b0[0]:.2g}..{b0[1]:.2g} | "
                     f"{'no' if r.warning else 'yes'} | {b1[0]:.2g}..{b1[1]:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="digits,image,text,text2")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    records = []
    for task_name in a.tasks.split(","):
        for seed in range(a.seeds):
            path = CACHE / f"{task_name}-s{seed}.json"
            if a.report_only and not path.is_file():
                continue
            records.append(record(task_name, seed))
            print(f"{task_name} s{seed}: done", file=sys.stderr, flush=True)
    text = report(records)
    print(text)
    if a.report_only or not any(not (CACHE / f"{t}-s{s}.json").is_file() for t in a.tasks.split(",") for s in range(a.seeds)):
        (CACHE.parent / "range_test_curves.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
