"""Does lrsearch's search beat what a user would do instead, at equal compute?

Every method is one call of the public API, ``lrsearch.search(job_dict, track=False)``, with a
job that selects the method (no monkeypatching of lrsearch, Optuna or Ray):

- ``lrsearch``: as shipped: the range test (the job's defaults: 100 steps, 1e-7 -> 10) bounds
  ``max_lr``, then TPE + ASHA over the family's space (``bert`` for MiniLM, ``efficientnet`` for
  EfficientNet-Lite0);
- ``peer``: the same TPE + ASHA over the same family space, no range test, ``max_lr``
  log-uniform over 1e-6..1e-2;
- ``random``: Optuna's random sampler, no early stopping, the same wide prior;
- ``hf_default``: one trial of the Hugging Face Trainer defaults: AdamW at 5e-5, linear decay,
  no warm-up, weight decay 0 (a start point in the ``default`` space, which holds ``linear``);
- ``family_default``: one trial of the family space's default schedule at the geometric middle of
  its ``max_lr_prior``, its parameters at the middle of their ranges;
- ``grid`` (oracle): the family's default schedule at 9 values of ``max_lr``, 2 per decade from
  1e-6 to 1e-2, every trial trained to the end; by default on one seed only (``--grid-seeds``).
  It is reported with the best of the whole grid (27 trial-epochs), not cut at the budget.

Ablations of lrsearch, each as shipped but for one documented job option:
``lrsearch_no_es`` (``search.early_stopping: none``), ``lrsearch_loss_rungs``
(``search.rung_metric: val_loss``) and ``lrsearch_rt5pct`` (``range_test.num_steps`` set to 5 % of
the trials' most steps with no cap at 100, e.g. 840 steps in the long regime where the shipped
rule stops at 100; the same 30 steps as shipped in the tiny one).

All methods train ``max_epochs`` 3, at most 2 trials at once (1 CPU and 1 torch thread each);
ASHA, where used, has grace period 1 and reduction factor 2 (lrsearch's defaults). Seed ``s``
sets both ``search.seed`` and the task's ``seed`` (data split, batch order, head init).

Compute and the budget rule. Compute is counted in trial-epochs: the range test's optimizer
steps / steps per epoch (``SearchResult.range_test_epochs``) are charged first, then each trial's
``stopped_at_epoch`` in creation order (``TrialRecord.number``). A trial's result becomes
available at the cumulative compute reached after adding its own epochs, and only if it
COMPLETED its full 3 epochs (a pruned trial's value is partial, not a usable result). The
best-so-far curve steps at those points; the value at the budget B is the curve's value at B, so a
trial that straddles B (its epochs end past B) does not count, nor does any later one. ASHA
searches get ``ceil((B - range test epochs) / 1.3) + 2`` trials (a trial trains 1.75 epochs on
average under ASHA with these rungs); runs with no early stopping get ``ceil(B / 3) + 1``. A run
whose total compute stays under B is counted with what it has and flagged as ``short``.

Tasks (all offline) and regimes; ``tiny`` has 12 optimizer steps per epoch (the range test costs
up to 8.3 trial-epochs, less when it stops at divergence), ``long`` 400 (4x the range test's
steps, which then cost 0.25 trial-epochs):

=======  =========================================================  ========================  =====================
task     model / data                                               tiny                      long
=======  =========================================================  ========================  =====================
text     MiniLM-L6, fortunes: politics, songs-poems, startrek,      192 train, batch 16,      1600 train, batch 4
         linux (not the demo's four); max_length 32                 256 val                   256 val
image    EfficientNet-Lite0, Fashion-MNIST 32x32                    384 train, batch 32,      3200 train, batch 8
                                                                    512 val                   512 val
digits   EfficientNet-Lite0, scikit-learn digits 32x32              384 train, batch 32,      1600 train, batch 4
                                                                    512 val                   192 val
=======  =========================================================  ========================  =====================

Usage::

    .venv/bin/python bench/search_quality.py                      # everything (hours: see below)
    .venv/bin/python bench/search_quality.py --regime tiny --tasks digits --seeds 5
    .venv/bin/python bench/search_quality.py --quick              # digits, tiny, 2 seeds, B=12 (~12 min)
    .venv/bin/python bench/search_quality.py --report-only        # tables + plot from the cache only

Options: ``--regime tiny|long|all``, ``--tasks text,image,digits``, ``--methods`` (comma list),
``--seeds N`` (tiny; 5), ``--long-seeds N`` (3), ``--grid-seeds N`` (1), ``--budget B`` (18).

Cache and resume. Each (regime, task, method, seed) run's summary (the job, every trial's number,
state, epochs, metric per epoch, schedule, max_lr and params, the range test's bounds, the curve,
the seconds) is one JSON file under ``bench/results/search_quality/``, named with a hash of the
job and the budget; a rerun skips every file already there, so the benchmark resumes after an
interruption and can be built up in the background (``nohup ... &``), one regime or task at a
time. The files (about 5.5 KB each) are committed with the repository: the report is rebuilt
with ``--report-only`` on any checkout, and a run on another machine adds to the same records
(runs kept only on a machine's disk are lost with it). Each search writes Ray Tune's results and
Ray's session files into temporary directories that are deleted once the summary is written. The
hash covers the job as lrsearch resolves it, defaults included, so a change of a default makes
new runs (a change of code behind the same config does not: delete those files by hand). The
report (Markdown on stdout and in ``bench/results/search_quality.md``, median best-so-far curves
with IQR bands in ``bench/results/search_quality.png``; ``_quick`` in both names with
``--quick``) is built from the cache alone, from whatever runs are there.

Time on 2 CPUs. Measured through ``lrsearch.search`` (one trial, so one core, while other work
kept the machine's load at 3-6), seconds per trial-epoch including validation: tiny text 14,
tiny image 3.7, tiny digits 3.2 (6 with two trials at once under that load); long text 133, long
image 38, long digits 26-29. lrsearch's range test (100 steps in the driver, 2 threads) took
25-35 s on digits; every search also pays 20-30 s to start Ray and build the task in its workers.
Per seed and task the methods train about 90 trial-epochs, 40-45 epoch-slots at 2 trials at once
(lrsearch ~17-28 and peer ~28 under ASHA, random 21, 3 for each default), plus the grid's 27 on
its one seed. Estimated full run (``--regime all``, 5 tiny seeds, 3 long seeds, grid on 1 seed)
on 2 otherwise idle cores: tiny ~2 h (text 1.1, image 0.5, digits 0.5), long ~8.5 h (text 5.6,
image 1.7, digits 1.2): about 10.5 h. Build it up per regime and task (``--regime long --tasks
digits`` ...); ``--quick`` takes about 12 min.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import lrsearch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "results" / "search_quality"
RESULTS = ROOT / "bench" / "results"
SPACES = ROOT / "search_spaces"

MAX_EPOCHS = 3
CONCURRENT = 2
DRIVER_THREADS = 2  # the range test runs in the driver while no trial runs
TIE = 0.005
WIDE_PRIOR = {"low": 1e-6, "high": 1e-2, "log": True}
GRID = [float(f"{10 ** (e / 2):.3g}") for e in range(-12, -3)]  # 1e-6 .. 1e-2, 2 per decade: 9 values
ASHA_EPOCHS_PER_TRIAL = 1.3  # below ASHA's ~1.75 (1 + 1/2 + 1/4) on purpose: overshoot B, not fall short

METHODS = ("lrsearch", "lrsearch_no_es", "lrsearch_loss_rungs", "lrsearch_rt5pct", "peer", "random",
           "hf_default", "family_default", "grid")
ASHA_METHODS = ("lrsearch", "lrsearch_loss_rungs", "lrsearch_rt5pct", "peer")
LRSEARCH_METHODS = ("lrsearch", "lrsearch_no_es", "lrsearch_loss_rungs", "lrsearch_rt5pct")  # the range test, lrsearch's defaults

CATEGORIES = ["politics", "songs-poems", "startrek", "linux"]
FAMILY = {"text": "bert", "image": "efficientnet", "digits": "efficientnet"}
TASKS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "text": {"kind": "text_classification", "model": "minilm-l6", "dataset": "fortunes",
                 "categories": CATEGORIES, "num_train": 192, "num_val": 256, "max_length": 32,
                 "batch_size": 16},
        "image": {"kind": "image_classification", "model": "efficientnet-lite0",
                  "dataset": "fashion_mnist", "image_size": 32, "num_train": 384, "num_val": 512,
                  "batch_size": 32},
        "digits": {"kind": "image_classification", "model": "efficientnet-lite0",
                   "dataset": "digits", "image_size": 32, "num_train": 384, "num_val": 512,
                   "batch_size": 32},
    },
    "long": {
        "text": {"kind": "text_classification", "model": "minilm-l6", "dataset": "fortunes",
                 "categories": CATEGORIES, "num_train": 1600, "num_val": 256, "max_length": 32,
                 "batch_size": 4},
        "image": {"kind": "image_classification", "model": "efficientnet-lite0",
                  "dataset": "fashion_mnist", "image_size": 32, "num_train": 3200, "num_val": 512,
                  "batch_size": 8},
        "digits": {"kind": "image_classification", "model": "efficientnet-lite0",
                   "dataset": "digits", "image_size": 32, "num_train": 1600, "num_val": 192,
                   "batch_size": 4},
    },
}
QUICK = {"regime": "tiny", "tasks": ["digits"], "seeds": 2, "budget": 12.0,
         "sizes": {"num_train": 384, "num_val": 256}}


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


def family_space(family: str) -> dict[str, Any]:
    return yaml.safe_load((SPACES / f"{family}.yaml").read_text(encoding="utf-8"))


def middle(spec: Any) -> Any:
    """The middle of a space parameter: geometric for log ranges, the middle choice of a list."""
    if isinstance(spec, dict):
        return math.sqrt(spec["low"] * spec["high"]) if spec.get("log") else (spec["low"] + spec["high"]) / 2
    if isinstance(spec, list):
        return spec[len(spec) // 2]
    return spec


def family_default_point(family: str, max_lr: float | None = None) -> dict[str, Any]:
    """The family's default schedule at ``max_lr`` (default: its prior's geometric middle)."""
    space = family_space(family)
    prior = space["max_lr_prior"]
    name = space["default_schedule"]
    point = {"max_lr": max_lr or math.sqrt(prior["low"] * prior["high"]), "schedule": name}
    point.update({k: middle(v) for k, v in (space["schedules"][name] or {}).items()})
    return point


def steps_per_epoch(task: dict[str, Any]) -> int:
    n, b = task["num_train"], task["batch_size"]
    # the image loaders drop the last partial batch, the text loader keeps it
    return n // b if task["kind"] == "image_classification" else math.ceil(n / b)


def range_test_steps(num_trials_guess: int, task: dict[str, Any], cap: int | None = 100) -> int:
    """As shipped (``cap`` 100): range_test.num_steps "auto" is 5 % of trials x epochs x steps,
    within 30..100; ``cap=None`` is the same share with no upper limit (``lrsearch_rt5pct``)."""
    steps = max(30, round(0.05 * num_trials_guess * MAX_EPOCHS * steps_per_epoch(task)))
    return steps if cap is None else min(cap, steps)


def range_test_epochs(num_trials_guess: int, task: dict[str, Any], cap: int | None = 100) -> float:
    return range_test_steps(num_trials_guess, task, cap) / steps_per_epoch(task)


def num_trials(method: str, budget: float, task: dict[str, Any]) -> int:
    if method in ("hf_default", "family_default"):
        return 1
    if method == "grid":
        return len(GRID)
    whole_trials = math.ceil(budget / MAX_EPOCHS) + 1  # +1: a diverged trial stops early
    if method == "random":
        return whole_trials
    if method == "lrsearch_no_es":  # the range test first, then whole trials
        return math.ceil((budget - range_test_epochs(whole_trials, task)) / MAX_EPOCHS) + 1
    range_test = 0.0
    if method in ("lrsearch", "lrsearch_loss_rungs", "lrsearch_rt5pct"):
        cap = None if method == "lrsearch_rt5pct" else 100
        range_test = range_test_epochs(math.ceil(budget / ASHA_EPOCHS_PER_TRIAL) + 2, task, cap)
    return math.ceil(max(budget - range_test, MAX_EPOCHS) / ASHA_EPOCHS_PER_TRIAL) + 2


def make_job(regime: str, task_name: str, method: str, seed: int, budget: float,
             sizes: dict[str, Any] | None = None, recipe: str = "shipped") -> dict[str, Any]:
    """The job dict (without ``storage``) that runs ``method``; ``recipe="none"``: no gradient
    clipping, the training recipe of lrsearch before its ``train`` section (the records of
    2026-11-29..12-01 ran with it)."""
    task = {**TASKS[regime][task_name], **(sizes or {}), "seed": seed}
    family = FAMILY[task_name]
    search: dict[str, Any] = {
        "algorithm": "tpe", "early_stopping": "asha", "seed": seed,
        "num_trials": num_trials(method, budget, task), "max_epochs": MAX_EPOCHS,
        "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": CONCURRENT,
    }
    job: dict[str, Any] = {
        "name": f"sq-{regime}-{task_name}-{method}-s{seed}",
        "task": task,
        "optimizer": {"name": "adamw", "weight_decay": 0.01},
        "space": {"family": family},
        "search": search,
        "resources": {"cpu": 1, "gpu": 0},
    }
    if recipe == "none":  # nor BatchNorm's recompute (train.recompute_bn), which came later too
        job["train"] = {"max_grad_norm": None, "recompute_bn": False}
    if method in LRSEARCH_METHODS:
        # as shipped: the sampler, early stopping and rungs are lrsearch's own defaults
        for key in ("algorithm", "early_stopping", "grace_period", "reduction_factor"):
            del search[key]
    else:
        job["range_test"] = {"enabled": False}
    if method == "lrsearch_no_es":  # ablation: as shipped, with early stopping off
        search["early_stopping"] = "none"
    if method == "lrsearch_loss_rungs":  # ablation: as shipped, ASHA ranking its rungs by val_loss
        search["rung_metric"] = "val_loss"
    if method == "lrsearch_rt5pct":  # ablation: a range test of 5 % of the trials' steps, no cap
        job["range_test"] = {"num_steps": range_test_steps(search["num_trials"], task, cap=None)}
    if method in ("peer", "random"):
        job["space"]["max_lr"] = dict(WIDE_PRIOR)
    if method in ("random", "hf_default", "family_default", "grid"):
        search["early_stopping"] = "none"
    if method in ("random", "grid"):
        search["algorithm"] = "random"
    if method == "hf_default":
        job["optimizer"]["weight_decay"] = 0.0  # transformers.TrainingArguments' default
        job["space"] = {"family": "default", "schedules": ["linear"]}
        search["start_points"] = [{"max_lr": 5e-5, "schedule": "linear", "warmup_frac": 0.0}]
    if method == "family_default":
        search["start_points"] = [family_default_point(family)]
    if method == "grid":
        search["start_points"] = [family_default_point(family, lr) for lr in GRID]
    return job


#: the training recipe of lrsearch before the job's ``train`` section: no clipping, fp32, 1 batch a step
_NO_RECIPE = {"max_grad_norm": None, "precision": "fp32", "gradient_accumulation_steps": 1}


def _hash_view(resolved: dict[str, Any]) -> dict[str, Any]:
    """The resolved job without the fields added since the records began that cannot change a
    search as set: ``task.num_test`` (only final runs read the test split, and adding it leaves the
    train and validation sets as they were), ``range_test.accumulation_steps`` left to the recipe
    (1 before), and a ``train`` recipe equal to the one before it existed. A job that runs as an
    old record ran keeps that record's name."""
    view = json.loads(json.dumps(resolved))
    view["task"].pop("num_test", None)
    if not view["train"].get("recompute_bn", True):
        del view["train"]["recompute_bn"]
    if view["range_test"].get("accumulation_steps") is None:
        view["range_test"]["accumulation_steps"] = view["train"]["gradient_accumulation_steps"]
    if view.get("train") == _NO_RECIPE:
        del view["train"]
    return view


def cache_path(job: dict[str, Any], budget: float) -> Path:
    # the job as lrsearch resolves it, defaults included: a change of lrsearch's defaults is a new run
    resolved = _hash_view(lrsearch.load_job({**job, "storage": {"path": "x"}}).model_dump(mode="json"))
    key = hashlib.sha1(json.dumps({"job": resolved, "budget": budget}, sort_keys=True).encode()).hexdigest()[:10]
    return CACHE / f"{job['name'].removeprefix('sq-')}-{key}.json"


# --------------------------------------------------------------------------------------------
# Running one search and extracting its summary
# --------------------------------------------------------------------------------------------


def curve(trials: list[dict[str, Any]], start: float, mode: str = "max") -> list[list[float]]:
    """Best-so-far ``[[compute, best], ...]``: a point where a COMPLETED trial improves the best,
    at the cumulative compute after its epochs (trials charged in creation order)."""
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    points, used, best = [], start, None
    for t in sorted(trials, key=lambda t: t["number"]):
        used += t["epochs"]
        final = t["metric_per_epoch"][-1] if t["metric_per_epoch"] else None
        if t["state"] == "completed" and final is not None and (best is None or better(final, best)):
            best = final
            points.append([round(used, 4), best])
    return points


def value_at(points: list[list[float]], budget: float) -> float | None:
    """The curve's value at ``budget``: the last point whose compute is within it."""
    inside = [v for c, v in points if c <= budget + 1e-9]
    return inside[-1] if inside else None


def summarize(result: Any, job: dict[str, Any], budget: float, method: str) -> dict[str, Any]:
    trials = [{
        "number": t.number, "state": t.state.value, "epochs": t.stopped_at_epoch,
        "metric_per_epoch": list(t.metric_per_epoch), "val_loss_per_epoch": list(t.val_loss_per_epoch),
        "schedule": t.schedule, "max_lr": t.max_lr,
        "params": t.params, "train_seconds": round(t.train_seconds, 2), "error": t.error,
    } for t in result.trials]
    start = float(result.range_test_epochs)
    points = curve(trials, start, result.mode)
    total = start + sum(t["epochs"] for t in trials)
    rt = result.range_test
    import lrsearch

    return {
        "method": method, "job": job, "budget": budget, "lrsearch_version": lrsearch.__version__,
        "metric": result.metric, "mode": result.mode, "max_epochs": MAX_EPOCHS,
        "steps_per_epoch": result.steps_per_epoch, "range_test_epochs": start,
        "range_test": None if rt is None else {"bounds": list(rt["bounds"]), "suggestions": rt["suggestions"],
                                               "steps": len(rt["lrs"])},
        "trial_epochs": result.trial_epochs, "compute_total": total, "reached_budget": total >= budget - 1e-9,
        "curve": points, "best_at_budget": value_at(points, budget),
        "best_overall": points[-1][1] if points else None,
        "seconds": round(result.seconds, 1), "trials": trials,
    }


def run_one(job: dict[str, Any], budget: float, method: str) -> dict[str, Any]:
    import lrsearch

    storage = tempfile.mkdtemp(prefix="lrsq-runs-")
    ray_tmp = tempfile.mkdtemp(prefix="lrsq-ray-")  # Ray's session logs, deleted with the results
    os.environ["RAY_TMPDIR"] = ray_tmp
    try:
        result = lrsearch.search({**job, "storage": {"path": storage}}, track=False, show_progress=False)
        return summarize(result, job, budget, method)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int, dict[str, Any]]]:
    """Every (regime, task, method, seed, job) the arguments ask for, seed-major so that a partial
    run has complete seeds."""
    runs = []
    for regime in args.regimes:
        seeds = args.seeds if regime == "tiny" else min(args.seeds, args.long_seeds)
        for task in args.tasks:
            for seed in range(seeds):
                for method in args.methods:
                    if method == "grid" and seed >= args.grid_seeds:
                        continue
                    job = make_job(regime, task, method, seed, args.budget, args.sizes, args.recipe)
                    runs.append((regime, task, method, seed, job))
    return runs


def run_all(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(DRIVER_THREADS)
    import lrsearch

    CACHE.mkdir(parents=True, exist_ok=True)
    runs = plan(args)
    for *_, job in runs:  # every job is valid before hours of searching start
        lrsearch.load_job({**job, "storage": {"path": "unused"}})
    todo = [r for r in runs if not cache_path(r[4], args.budget).is_file()]
    print(f"# {len(runs)} runs, {len(runs) - len(todo)} cached, {len(todo)} to run", file=sys.stderr)
    for i, (regime, task, method, seed, job) in enumerate(todo, 1):
        path = cache_path(job, args.budget)
        started = time.perf_counter()
        print(f"[{i}/{len(todo)}] {regime} {task} {method} seed {seed} "
              f"({job['search']['num_trials']} trials) ...", file=sys.stderr, flush=True)
        try:
            summary = run_one(job, args.budget, method)
        except (KeyboardInterrupt, lrsearch.Interrupted):
            print("interrupted: finished runs are cached; rerun the same command to continue",
                  file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as exc:  # one failed search must not stop the rest; it is retried next time
            lines, frame = str(exc).strip().splitlines(), traceback.extract_tb(exc.__traceback__)[-1]
            print(f"    failed: {type(exc).__name__}: {lines[-1] if lines else ''} "
                  f"(at {frame.filename}:{frame.lineno}); not cached", file=sys.stderr)
            continue
        errored = [t for t in summary["trials"] if t["state"] == "errored"]
        if errored:
            # an infrastructure failure is not a result of the method: not cached, retried next time
            print(f"    {len(errored)} trial(s) errored ({errored[0]['error']}); not cached", file=sys.stderr)
            continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, separators=(",", ":")) + "\n")
        tmp.replace(path)
        print(f"    best at B {fmt(summary['best_at_budget'])}, compute {summary['compute_total']:.1f}, "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def load(args: argparse.Namespace) -> dict[tuple[str, str, str], dict[int, dict[str, Any]]]:
    """``{(regime, task, method): {seed: summary}}`` for the runs the arguments ask for."""
    data: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for regime, task, method, seed, job in plan(args):
        path = cache_path(job, args.budget)
        if path.is_file():
            data.setdefault((regime, task, method), {})[seed] = json.loads(path.read_text())
    return data


def method_value(s: dict[str, Any]) -> float | None:
    """A run's result at the budget; the grid oracle is its best over the whole grid."""
    return s["best_overall"] if s["method"] == "grid" else s["best_at_budget"]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = np.percentile(values, [50, 25, 75])
    return float(q[0]), float(q[1]), float(q[2])


def first_reach(points: list[list[float]], target: float) -> float:
    return next((c for c, v in points if v >= target - 1e-12), math.inf)


def spearman(trials: list[dict[str, Any]], by_loss: bool = False) -> tuple[float | None, int]:
    """Rank correlation of the rung-1 value (accuracy, or minus the val loss when ``by_loss``) with
    the final accuracy."""
    from scipy.stats import spearmanr

    def rung1(t: dict[str, Any]) -> float:
        return -t["val_loss_per_epoch"][0] if by_loss else t["metric_per_epoch"][0]

    pairs = [(rung1(t), t["metric_per_epoch"][-1]) for t in trials
             if t["state"] == "completed" and len(t["metric_per_epoch"]) == MAX_EPOCHS]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None, len(pairs)
    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return float(rho), len(pairs)


def winner_cut(runs: dict[int, dict[str, Any]]) -> str:
    """In how many seeds a rung-1 halving would have cut the trial that wins at the full budget,
    for a search that trained every trial to the end (``k/n``; ``-`` when there is none)."""
    bottom = seeds = 0
    for s in runs.values():
        done = [t for t in s["trials"] if t["state"] == "completed" and len(t["metric_per_epoch"]) == MAX_EPOCHS]
        if len(done) < 2:
            continue
        seeds += 1
        winner = max(done, key=lambda t: t["metric_per_epoch"][-1])
        firsts = sorted((t["metric_per_epoch"][0] for t in done), reverse=True)
        # synchronous successive halving with reduction factor 2 keeps the top half at rung 1
        keep = firsts[: math.ceil(len(firsts) / 2)]
        bottom += winner["metric_per_epoch"][0] < keep[-1]
    return f"{bottom}/{seeds}" if seeds else "-"


def warmup_frac(t: dict[str, Any]) -> float:
    p = t["params"] or {}
    return float(p.get("warmup_frac", p.get("pct_start", p.get("cut_frac", 0.0))) or 0.0)


def report(args: argparse.Namespace) -> str:
    data = load(args)
    methods = list(args.methods)
    out: list[str] = []
    w = out.append
    w(f"# Search quality: lrsearch vs. alternatives at equal compute (B = {args.budget:g} trial-epochs)\n")
    w("Value: best validation accuracy among trials that completed all 3 epochs within B trial-epochs "
      "(range test charged first; trials in creation order; a trial straddling B does not count). "
      "`grid` is an oracle: its best over the whole grid (27 trial-epochs), usually 1 seed. "
      "`hf_default` and `family_default` train one trial (3 trial-epochs).\n")
    planned = plan(args)
    w(f"{sum(len(v) for v in data.values())} of {len(planned)} planned runs are in the cache.\n")
    if not data:
        return "\n".join(out)

    for regime in args.regimes:
        keys = [(regime, t, m) for t in args.tasks for m in methods if (regime, t, m) in data]
        if not keys:
            continue
        w(f"## Regime `{regime}`\n")
        # setup and timings
        w("| task | steps/epoch | range test (trial-epochs) | s / trial-epoch (median) | "
          + " | ".join(f"{m} search s" for m in methods) + " |")
        w("|---" * (4 + len(methods)) + "|")
        for task in args.tasks:
            runs = [s for m in methods for s in data.get((regime, task, m), {}).values()]
            if not runs:
                continue
            per_epoch = [t["train_seconds"] / t["epochs"] for s in runs for t in s["trials"] if t["epochs"]]
            rt = [s["range_test_epochs"] for s in data.get((regime, task, "lrsearch"), {}).values()]
            secs = []
            for m in methods:
                vals = [s["seconds"] for s in data.get((regime, task, m), {}).values()]
                secs.append(f"{np.median(vals):.0f}" if vals else "-")
            w(f"| {task} | {runs[0]['steps_per_epoch']} | {fmt(float(np.median(rt)) if rt else None, 2)} | "
              f"{fmt(float(np.median(per_epoch)) if per_epoch else None, 1)} | " + " | ".join(secs) + " |")
        w("")

        # best at B
        w("### Best at B: median [IQR] over seeds\n")
        w("| task | " + " | ".join(methods) + " |")
        w("|---" * (1 + len(methods)) + "|")
        for task in args.tasks:
            cells = []
            for m in methods:
                runs = data.get((regime, task, m), {})
                vals = [v for v in (method_value(s) for s in runs.values()) if v is not None]
                if not runs:
                    cells.append("-")
                    continue
                notes = []
                if vals and len(vals) < len(runs):
                    notes.append(f"{len(runs) - len(vals)} none")
                short = sum(1 for s in runs.values() if not s["reached_budget"] and m not in
                            ("hf_default", "family_default", "grid"))
                if short:
                    notes.append(f"{short} short")
                if vals:
                    med, lo, hi = quartiles(vals)
                    cell = f"{fmt(med)} [{fmt(lo)}-{fmt(hi)}] n={len(runs)}"
                else:
                    cell = f"none n={len(runs)}"
                cells.append(cell + (f" ({', '.join(notes)})" if notes else ""))
            w(f"| {task} | " + " | ".join(cells) + " |")
        w("")

        # compute to reach the peer's median
        w("### Trial-epochs to reach the peer's median best at B (median over seeds)\n")
        w("| task | peer median | " + " | ".join(methods) + " |")
        w("|---" * (2 + len(methods)) + "|")
        for task in args.tasks:
            peer = [v for v in (s["best_at_budget"] for s in data.get((regime, task, "peer"), {}).values())
                    if v is not None]
            if not peer:
                if data.get((regime, task, "peer")):
                    w(f"| {task} | none | " + " | ".join("-" for _ in methods) + " |")
                continue
            target = float(np.median(peer))
            cells = []
            for m in methods:
                runs = data.get((regime, task, m), {})
                if not runs:
                    cells.append("-")
                    continue
                reach = [first_reach(s["curve"], target) for s in runs.values()]
                med = float(np.median(reach))
                got = sum(math.isfinite(r) for r in reach)
                cells.append(("never" if not math.isfinite(med) else f"{med:.1f}") + f" ({got}/{len(reach)})")
            w(f"| {task} | {fmt(target)} | " + " | ".join(cells) + " |")
        w("\n(k/n: seeds whose run reached it at all, within the run's own compute.)\n")

        # win / tie / loss
        others = [m for m in methods if m != "lrsearch"]
        if "lrsearch" in methods and others:
            w(f"### lrsearch vs. each method, paired by seed: win / tie (within {TIE}) / loss\n")
            w("| task | " + " | ".join(others) + " |")
            w("|---" * (1 + len(others)) + "|")
            for task in args.tasks:
                mine = data.get((regime, task, "lrsearch"), {})
                if not mine:
                    continue
                cells = []
                for m in others:
                    theirs = data.get((regime, task, m), {})
                    win = tie = loss = 0
                    for seed in sorted(set(mine) & set(theirs)):
                        a, b = method_value(mine[seed]), method_value(theirs[seed])
                        if a is None and b is None or (a is not None and b is not None and abs(a - b) <= TIE):
                            tie += 1
                        elif b is None or (a is not None and a > b):
                            win += 1
                        else:
                            loss += 1
                    cells.append(f"{win}/{tie}/{loss}" if win + tie + loss else "-")
                w(f"| {task} | " + " | ".join(cells) + " |")
            w("\n(no completed trial within B counts as worse than any value.)\n")

        # rung-1 vs final
        w("### Rung-1 (epoch 1) vs. final (epoch 3) Spearman rank correlation, completed trials pooled over seeds\n")
        w("| task | " + " | ".join(methods) + " |")
        w("|---" * (1 + len(methods)) + "|")
        for task in args.tasks:
            cells = []
            for m in methods:
                trials = [t for s in data.get((regime, task, m), {}).values() for t in s["trials"]]
                rho, n = spearman(trials, by_loss=m == "lrsearch_loss_rungs")
                cells.append(f"{fmt(rho, 2)} (n={n})" if trials else "-")
            w(f"| {task} | " + " | ".join(cells) + " |")
        w("\n(ASHA methods' completed trials are the ones that ranked well at rung 1: a restricted "
          "range; `random` trains every trial to the end and is the unbiased sample. "
          "`lrsearch_loss_rungs` is ranked by what its rungs rank by: minus the epoch-1 val loss.)\n")

        # fidelity
        w("### Fidelity of early stopping\n")
        heads = [f"{m}: pruned inside warm-up" for m in ASHA_METHODS if m in methods]
        unpruned = [m for m in ("lrsearch_no_es", "random") if m in methods]
        heads += [f"{m}: winner in the bottom half at epoch 1" for m in unpruned]
        w("| task | " + " | ".join(heads) + " |")
        w("|---" * (1 + len(heads)) + "|")
        for task in args.tasks:
            cells = []
            for m in ASHA_METHODS:
                if m not in methods:
                    continue
                runs = data.get((regime, task, m), {})
                if not runs:
                    cells.append("-")
                    continue
                pruned = [t for s in runs.values() for t in s["trials"] if t["state"] == "pruned"]
                inside = sum(1 for t in pruned if t["epochs"] / MAX_EPOCHS < warmup_frac(t))
                cells.append(f"{inside}/{len(pruned)}" + (f" ({inside / len(pruned):.0%})" if pruned else ""))
            cells += [winner_cut(data.get((regime, task, m), {})) for m in unpruned]
            w(f"| {task} | " + " | ".join(cells) + " |")
        w("\n(warm-up: `warmup_frac`, `pct_start` or `cut_frac` > epochs trained / 3 when pruned. "
          "Bottom half: the config that wins at the full budget would have been cut by a rung-1 "
          "halving of a search whose trials all ran to the end: `lrsearch_no_es` samples lrsearch's "
          "own space, `random` the wide prior.)\n")

        # range test bounds
        if "lrsearch" in methods:
            w("### Range-test bounds over seeds (lrsearch)\n")
            w("| task | seeds | low min..max | high min..max |")
            w("|---|---|---|---|")
            for task in args.tasks:
                bounds = [s["range_test"]["bounds"] for s in data.get((regime, task, "lrsearch"), {}).values()
                          if s["range_test"]]
                if not bounds:
                    continue
                lows, highs = [b[0] for b in bounds], [b[1] for b in bounds]
                w(f"| {task} | {len(bounds)} | {min(lows):.2e}..{max(lows):.2e} | {min(highs):.2e}..{max(highs):.2e} |")
            w("")
    return "\n".join(out)


def plot(args: argparse.Namespace, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load(args)
    rows = [r for r in args.regimes if any(k[0] == r for k in data)]
    if not rows:
        return False
    cols = list(args.tasks)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.6 * len(cols), 3.6 * len(rows)),
                             squeeze=False)
    xs = np.linspace(0, args.budget, int(args.budget * 10) + 1)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for i, regime in enumerate(rows):
        for j, task in enumerate(cols):
            ax = axes[i][j]
            for m in args.methods:
                runs = list(data.get((regime, task, m), {}).values())
                if not runs:
                    continue
                if m == "grid":
                    vals = [s["best_overall"] for s in runs if s["best_overall"] is not None]
                    if vals:
                        ax.axhline(float(np.median(vals)), ls="--", color=colors[m], lw=1,
                                   label=f"grid oracle ({runs[0]['compute_total']:g} ep.)")
                    continue
                ys = np.full((len(runs), len(xs)), np.nan)
                for k, s in enumerate(runs):
                    for c, v in s["curve"]:
                        ys[k, xs >= c - 1e-9] = v
                enough = np.sum(~np.isnan(ys), axis=0) >= math.ceil(len(runs) / 2)
                if not enough.any():
                    continue
                # a seed without a result yet counts as below every value
                filled = np.where(np.isnan(ys), -1e9, ys)
                med, lo, hi = (np.where(enough & (q > -1e8), q, np.nan)
                               for q in np.percentile(filled, [50, 25, 75], axis=0))
                ax.step(xs, med, where="post", color=colors[m], label=f"{m} (n={len(runs)})")
                ax.fill_between(xs, lo, hi, step="post", color=colors[m], alpha=0.15)
            rt = [s["range_test_epochs"] for s in data.get((regime, task, "lrsearch"), {}).values()]
            if rt:
                ax.axvline(float(np.median(rt)), color="grey", lw=0.8, ls=":")
            ax.set_title(f"{task}, {regime} epochs")
            ax.set_xlabel("trial-epochs (range test included)")
            ax.set_ylabel("best val accuracy so far")
            ax.set_xlim(0, args.budget)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=("tiny", "long", "all"), default=None,
                   help="epochs of 12 or 400 optimizer steps (default: all; tiny with --quick)")
    p.add_argument("--tasks", default=None, help="comma list of text,image,digits (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds in the tiny regime (default 5)")
    p.add_argument("--long-seeds", type=int, default=3, help="at most this many seeds in the long regime")
    p.add_argument("--grid-seeds", type=int, default=1, help="seeds of the grid oracle")
    p.add_argument("--budget", type=float, default=None, help="trial-epochs per method (default 18)")
    p.add_argument("--quick", action="store_true",
                   help="digits, tiny, 2 seeds, budget 12 (~12 min on 2 CPUs)")
    p.add_argument("--report-only", action="store_true", help="tables and plot from the cache only")
    p.add_argument("--recipe", choices=("shipped", "none"), default="shipped",
                   help="shipped: the job's default train recipe (clipping at 1.0); none: no clipping, "
                        "as lrsearch trained before its train section (the committed records)")
    args = p.parse_args(argv)
    q = QUICK if args.quick else {}
    regime = args.regime or q.get("regime", "all")
    args.regimes = ["tiny", "long"] if regime == "all" else [regime]
    args.tasks = args.tasks.split(",") if args.tasks else q.get("tasks", ["text", "image", "digits"])
    args.methods = args.methods.split(",")
    args.seeds = args.seeds or q.get("seeds", 5)
    args.budget = args.budget or q.get("budget", 18.0)
    args.sizes = q.get("sizes")
    for name, values, allowed in (("--tasks", args.tasks, ("text", "image", "digits")),
                                  ("--methods", args.methods, METHODS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"{name}: unknown {bad[0]!r}; allowed: {', '.join(allowed)}")
    if args.budget <= 0 or args.seeds < 1:
        p.error("--budget and --seeds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # trials run one torch thread each on their 1 Ray CPU; Ray's workers inherit this
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not args.report_only:
        run_all(args)
    text = report(args)
    print(text)
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"search_quality{suffix}.md").write_text(text + "\n")
    png = RESULTS / f"search_quality{suffix}.png"
    if plot(args, png):
        print(f"\n(plot: {png.relative_to(ROOT)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
