"""lrsearch vs. random search vs. the family's default config, at equal compute in trial-epochs.

For each task (MiniLM-L6 on fortunes, EfficientNet-Lite0 on Fashion-MNIST; small subsets, CPU) this
runs three searches through :func:`lrsearch.search.run_search`, one trial at a time on 2 CPUs:

- ``lrsearch``: the range test (1e-7 -> 1, 80 steps) sets the ``max_lr`` bounds, then TPE + ASHA
  (grace period 1, reduction factor 3) over the family's schedules;
- ``random``: no range test, ``max_lr`` log-uniform over 1e-7..10, the family's schedules, every
  trial trained for the full budget (grace period = max epochs, so ASHA stops nothing), and the
  Optuna sampler kept in its random start-up phase for every trial (pure random search);
- ``default``: one trial of the family's default recipe (MiniLM: AdamW 2e-5, linear decay, 10 %
  warmup; EfficientNet: cosine at the middle of its prior).

Compute is counted in trial-epochs (one epoch of one trial); the range test's optimizer steps count
as ``steps / steps_per_epoch`` trial-epochs. A method's result at the budget B is the best final
(epoch-3) validation accuracy among the trials it started before its cumulative compute reached B.
Also reported: the compute lrsearch needs to match each baseline's best, Ray Tune's overhead
(wall time minus range test and the trials' own training + validation time, as a fraction of
wall time) and the Spearman correlation between trials' metric at the first ASHA rung (epoch 1)
and at the full budget (epoch 3). Prints Markdown tables (copied into BENCHMARKS.md).

    .venv/bin/python bench/search_vs_baselines.py [--task text|image|all] [--quick] [--budget 18]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna.samplers
import torch
import yaml
from scipy.stats import spearmanr

import lrsearch.find_lr
import lrsearch.search
from lrsearch.config import JobConfig, parse_job
from lrsearch.search import SearchResult, run_search
from lrsearch.space import SpaceSampler, load_space

SEED = 0
THREADS = 2
MAX_EPOCHS = 3

TASKS: dict[str, dict[str, Any]] = {
    "text": {
        "kind": "text_classification", "model": "minilm-l6", "dataset": "fortunes",
        "categories": ["computers", "food", "law", "science"],
        "num_train": 256, "num_val": 128, "max_length": 48, "batch_size": 16, "seed": SEED,
    },
    "image": {
        "kind": "image_classification", "model": "efficientnet-lite0", "dataset": "fashion_mnist",
        "image_size": 32, "num_train": 512, "num_val": 256, "batch_size": 32, "seed": SEED,
    },
}
QUICK_SIZES = {"text": {"num_train": 64, "num_val": 32}, "image": {"num_train": 128, "num_val": 64}}
FAMILY = {"text": "bert", "image": "efficientnet"}
#: the family's default peak LR; None: the geometric middle of the family's max_lr prior
DEFAULT_LR: dict[str, float | None] = {"bert": 2e-5, "efficientnet": None}
METHODS = ("lrsearch", "random", "default")


# --------------------------------------------------------------------------------------------
# Instrumentation (bench-only: wraps lrsearch functions to time them; lrsearch is not changed)
# --------------------------------------------------------------------------------------------


class Probe:
    """Times the range test and the driver's task build inside one ``run_search`` call."""

    def __init__(self) -> None:
        self.range_test_s = 0.0
        self.build_task_s = 0.0
        self.steps_per_epoch: int | None = None


@contextmanager
def probed(probe: Probe):
    orig_find_lr, orig_build = lrsearch.find_lr.find_lr, lrsearch.search.build_task

    def find_lr(*args: Any, **kwargs: Any):
        t0 = time.perf_counter()
        try:
            return orig_find_lr(*args, **kwargs)
        finally:
            probe.range_test_s += time.perf_counter() - t0

    def build_task(job: JobConfig):
        t0 = time.perf_counter()
        try:
            task = orig_build(job)
        finally:
            probe.build_task_s += time.perf_counter() - t0
        n = len(task.train_loader)
        cap = job.search.max_steps_per_epoch
        probe.steps_per_epoch = min(n, cap) if cap else n
        return task

    # run_search imports find_lr at call time and build_task at module import
    lrsearch.find_lr.find_lr, lrsearch.search.build_task = find_lr, build_task
    try:
        yield probe
    finally:
        lrsearch.find_lr.find_lr, lrsearch.search.build_task = orig_find_lr, orig_build


class RandomTPESampler(optuna.samplers.TPESampler):
    """TPE that never leaves its random start-up phase: every trial is sampled at random."""

    def __init__(self, *args: Any, n_startup_trials: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, n_startup_trials=10**9, **kwargs)


@contextmanager
def random_sampler(enabled: bool):
    # run_search builds TPESampler(n_startup_trials=min(5, num_trials)) from optuna.samplers at
    # call time; for the random-search baseline every trial must be a start-up (random) trial.
    orig = optuna.samplers.TPESampler
    if enabled:
        optuna.samplers.TPESampler = RandomTPESampler
    try:
        yield
    finally:
        optuna.samplers.TPESampler = orig


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


def default_point(family: str) -> tuple[float, str, dict[str, Any]]:
    """The family's default recipe: peak LR, default schedule, its parameters at their middles."""
    space = load_space(family)
    prior = space.max_lr_prior
    lr = DEFAULT_LR[family] or math.sqrt(prior.low * prior.high)
    point = SpaceSampler(space).first_point(lr)
    params = {k.split("/", 1)[1]: v for k, v in point.items() if "/" in k}
    return lr, space.default_schedule, params


def write_default_space(family: str, path: Path) -> tuple[float, str, dict[str, Any]]:
    """A space file with one schedule and every parameter (and max_lr) pinned to the default."""
    lr, schedule, params = default_point(family)
    space = load_space(family)
    data = {
        "family": family,
        "description": f"{family} default recipe, pinned (bench)",
        "max_lr_prior": {"low": lr, "high": lr * (1 + 1e-6), "log": True},
        "default_schedule": schedule,
        "schedules": {schedule: params},
    }
    if space.weight_decay is not None or space.layer_decay is not None:
        raise SystemExit(f"{family}: space searches weight/layer decay; pin them here too")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return lr, schedule, params


def make_job(which: str, method: str, args: argparse.Namespace, tmp: Path) -> JobConfig:
    task = dict(TASKS[which])
    if args.quick:
        task.update(QUICK_SIZES[which])
    family = FAMILY[which]
    search = {"max_epochs": MAX_EPOCHS, "grace_period": 1, "reduction_factor": 3,
              "max_concurrent_trials": 1, "seed": SEED, "max_failures": 0}
    if method == "lrsearch":
        range_test = {"start_lr": 1e-7, "end_lr": 1.0, "num_steps": args.rt_steps}
        space: dict[str, Any] = {"family": family}
        search["num_trials"] = args.lrsearch_trials
    elif method == "random":
        range_test = {"enabled": False}
        space = {"family": family, "max_lr": {"low": 1e-7, "high": 10.0, "log": True}}
        search.update(num_trials=args.random_trials, grace_period=MAX_EPOCHS)
    else:
        range_test = {"enabled": False}
        space_file = tmp / f"{family}-default.yaml"
        write_default_space(family, space_file)
        space = {"file": str(space_file)}
        search["num_trials"] = 1
    return parse_job({
        "name": f"{which}-{method}",
        "task": task,
        "optimizer": {"name": "adamw", "weight_decay": 0.01},
        "range_test": range_test,
        "space": space,
        "search": search,
        "resources": {"cpu": THREADS, "gpu": 0},
        "storage": {"path": str(tmp / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "search-vs-baselines"},
    }, source=f"bench:{which}:{method}")


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def start_order(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials in the order Tune created them.

    A trial's directory is ``<trainable>_<trial_id>_<n>_<params>_<date>``, where ``n`` counts the
    trials the searcher created (1, 2, ...); with one trial at a time this is also the run order.
    """
    def key(t: dict[str, Any]) -> int:
        m = re.search(rf"_{re.escape(str(t['trial_id']))}_(\d+)_", Path(t["path"]).name)
        if m is None:
            raise SystemExit(f"cannot read the creation number from trial path {t['path']!r}")
        return int(m.group(1))
    return sorted(trials, key=key)


def walk(run: dict[str, Any]) -> list[tuple[float, float | None, dict[str, Any]]]:
    """``(compute after the trial, best completed final metric so far, trial)`` in start order."""
    cum, best, out = run["rt_epochs"], None, []
    for t in start_order(run["result"].trials):
        cum += t["stopped_at_epoch"]
        if t["state"] == "completed" and t["final_metric"] is not None:
            best = t["final_metric"] if best is None else max(best, t["final_metric"])
        out.append((cum, best, t))
    return out


def at_budget(run: dict[str, Any], budget: float) -> tuple[float | None, float, int]:
    """Best completed metric among trials started before compute reached ``budget``; compute used."""
    cum, best, n = run["rt_epochs"], None, 0
    for t in start_order(run["result"].trials):
        if cum >= budget:
            break
        cum += t["stopped_at_epoch"]
        n += 1
        if t["state"] == "completed" and t["final_metric"] is not None:
            best = t["final_metric"] if best is None else max(best, t["final_metric"])
    return best, cum, n


def compute_to_match(run: dict[str, Any], target: float | None) -> float | None:
    if target is None:
        return None
    for cum, best, _ in walk(run):
        if best is not None and best >= target:
            return cum
    return None


def trial_epochs(run: dict[str, Any]) -> int:
    return sum(t["stopped_at_epoch"] for t in run["result"].trials)


def rung_pairs(runs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(metric after epoch 1, metric after epoch MAX_EPOCHS) of every trial that ran the full budget."""
    pairs = []
    for run in runs:
        for t in run["result"].trials:
            m = t["metric_per_epoch"]
            if t["state"] == "completed" and len(m) >= MAX_EPOCHS:
                pairs.append((m[0], m[MAX_EPOCHS - 1]))
    return pairs


def spearman(pairs: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    if len(pairs) < 3:
        return None, None
    x, y = zip(*pairs, strict=True)
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None, None
    res = spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_method(which: str, method: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    job = make_job(which, method, args, tmp)
    probe = Probe()
    # find_lr does not seed torch: the range test's dropout masks would depend on what this
    # process ran before (trials are seeded on their workers)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    with probed(probe), random_sampler(method == "random"):
        result: SearchResult = run_search(job, show_progress=False, track=args.track)
    wall = time.perf_counter() - t0
    spe = probe.steps_per_epoch or 1
    rt_steps = 0
    if result.range_test:
        rt = result.range_test
        rt_steps = len(rt["lrs"]) + (rt["stop_reason"] == "non_finite")
    run = {"which": which, "method": method, "job": job, "result": result, "wall": wall,
           "rt_s": probe.range_test_s, "build_s": probe.build_task_s, "spe": spe,
           "rt_steps": rt_steps, "rt_epochs": rt_steps / spe}
    c = result.counts
    print(f"[{which}] {method}: {c['total']} trials ({c['completed']} completed, {c['pruned']} pruned, "
          f"{c['diverged']} diverged, {c['errored']} errored), {trial_epochs(run)} trial-epochs"
          + (f" + range test {rt_steps} steps ({run['rt_epochs']:.1f} epochs, {probe.range_test_s:.0f} s, "
             f"bounds {result.range_test['bounds'][0]:.2g}..{result.range_test['bounds'][1]:.2g}, "
             f"{result.range_test['stop_reason']})" if result.range_test else "")
          + f"; best {result.best_metric}; {wall:.0f} s", file=sys.stderr)
    for i, t in enumerate(start_order(result.trials), 1):
        print(f"    {i}. {t['trial_id']}: {t['schedule']} max_lr {t['max_lr']:.3g} {t['state']} "
              f"@{t['stopped_at_epoch']} {[round(v, 3) for v in t['metric_per_epoch']]} "
              f"train {t['train_seconds']:.1f} s / trial {t['wall_seconds']:.1f} s", file=sys.stderr)
    return run


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def trial_desc(t: dict[str, Any]) -> str:
    import json

    params = json.loads(t["config"]).get(t["schedule"]) or {}
    extra = ", ".join(f"{k} {v:.2g}" for k, v in params.items() if isinstance(v, int | float))
    return f"{t['schedule']} {t['max_lr']:.2g}" + (f" ({extra})" if extra else "")


def print_task(which: str, runs: dict[str, dict[str, Any]], budget: float) -> None:
    task = runs["lrsearch"]["job"].task
    name = f"{task.model}/{task.dataset}"
    print(f"\n**{name}** (budget B = {budget:g} trial-epochs; max {MAX_EPOCHS} epochs per trial; "
          f"{runs['lrsearch']['spe']} optimizer steps per epoch)\n")
    print("| method | trials (completed / pruned / diverged) | compute used (trial-epochs) "
          "| best val acc | best val acc within B (compute) | best trial | wall (s) |")
    print("|---|---|---:|---:|---:|---|---:|")
    for m in METHODS:
        run = runs[m]
        r: SearchResult = run["result"]
        c = r.counts
        used = trial_epochs(run) + run["rt_epochs"]
        used_s = f"{used:.1f}" + (f" ({trial_epochs(run)} + range test {run['rt_epochs']:.1f})"
                                  if run["rt_steps"] else "")
        b_best, b_used, b_n = at_budget(run, budget)
        best_trial = r.best_config and next(t for t in r.trials if t["trial_id"] == r.best_config["trial_id"])
        print(f"| {m} | {c['total']} ({c['completed']} / {c['pruned']} / {c['diverged']}) | {used_s} "
              f"| {fmt(r.best_metric)} | {fmt(b_best)} ({b_used:.1f}, {b_n} trials) "
              f"| {trial_desc(best_trial) if best_trial else '-'} | {run['wall']:.0f} |")

    print("\n| method | # | schedule, max_lr (params) | state | val acc per epoch | train + val (s) "
          "| trial wall (s) |")
    print("|---|---:|---|---|---|---:|---:|")
    for m in METHODS:
        for i, t in enumerate(start_order(runs[m]["result"].trials), 1):
            accs = ", ".join(f"{v:.3f}" for v in t["metric_per_epoch"])
            print(f"| {m} | {i} | {trial_desc(t)} | {t['state']} | {accs} | {t['train_seconds']:.1f} "
                  f"| {t['wall_seconds']:.1f} |")

    print("\n| baseline | its best val acc | its compute | lrsearch compute to match (trial-epochs, incl. range test) |")
    print("|---|---:|---:|---:|")
    for m in ("random", "default"):
        run = runs[m]
        target = run["result"].best_metric
        need = compute_to_match(runs["lrsearch"], target)
        used = trial_epochs(run)
        print(f"| {m} | {fmt(target)} | {used} | "
              f"{'not matched' if need is None and target is not None else fmt(need, '.1f')} |")

    print("\n| run | wall (s) | range test (s) | driver task build (s) | trials' train + val (s) "
          "| in-trial other (s) | rest: Ray + bookkeeping (s) | overhead / wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in METHODS:
        run = runs[m]
        trials = run["result"].trials
        train = sum(t["train_seconds"] for t in trials)
        in_trial = sum(t["wall_seconds"] for t in trials) - train
        wall = run["wall"]
        rest = wall - run["rt_s"] - run["build_s"] - train - in_trial
        over = (wall - run["rt_s"] - train) / wall
        print(f"| {m} | {wall:.0f} | {run['rt_s']:.0f} | {run['build_s']:.0f} | {train:.0f} "
              f"| {in_trial:.0f} | {rest:.0f} | {over:.2f} |")


def print_spearman(all_runs: list[dict[str, dict[str, Any]]]) -> None:
    print(f"\nSpearman correlation of trials' val accuracy after epoch 1 (first ASHA rung) and after "
          f"epoch {MAX_EPOCHS} (full budget), trials that ran the full budget:\n")
    print("| task | trials pooled | n | Spearman rho | p |")
    print("|---|---|---:|---:|---:|")
    for runs in all_runs:
        task = runs["lrsearch"]["job"].task
        name = f"{task.model}/{task.dataset}"
        for label, methods in (("random + lrsearch", ("random", "lrsearch")), ("random only", ("random",)),
                               ("lrsearch only", ("lrsearch",))):
            pairs = rung_pairs([runs[m] for m in methods])
            rho, p = spearman(pairs)
            print(f"| {name} | {label} | {len(pairs)} | {fmt(rho, '.2f')} | {fmt(p, '.2g')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("text", "image", "all"), default="all")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny subsets, budget 9, 20 range-test steps, 3 trials each")
    parser.add_argument("--budget", type=float, default=None, help="B in trial-epochs (default 18)")
    parser.add_argument("--lrsearch-trials", type=int, default=None)
    parser.add_argument("--random-trials", type=int, default=None)
    parser.add_argument("--track", action="store_true",
                        help="log every search to a throwaway MLflow sqlite store (default: off)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    # run_search(address=None) calls ray.init(), which joins the newest cluster started with
    # `ray start` on this machine if one is up (e.g. a test's); the bench wants its own.
    os.environ["RAY_ADDRESS"] = "local"
    if args.quick:
        args.budget = args.budget or 9
        args.rt_steps = 20
        args.lrsearch_trials = args.lrsearch_trials or 3
        args.random_trials = args.random_trials or 3
    else:
        args.budget = args.budget or 18
        args.rt_steps = 80
        # range test (~5 trial-epochs) + ~8 ASHA trials (1 epoch, a third of them 3) is about B
        args.lrsearch_trials = args.lrsearch_trials or 8
        # B / 3 full-budget trials, plus spares for the ones that diverge in their first epoch
        args.random_trials = args.random_trials or int(args.budget // MAX_EPOCHS) + 2
    which = ("text", "image") if args.task == "all" else (args.task,)
    print(f"torch {torch.__version__}, CPU, {THREADS} CPUs per trial, one trial at a time; budget "
          f"{args.budget:g} trial-epochs; lrsearch {args.lrsearch_trials} trials + range test 1e-7 -> 1 "
          f"({args.rt_steps} steps); random {args.random_trials} trials over 1e-7..10; default 1 trial; "
          f"{MAX_EPOCHS} epochs max, seed {SEED}; MLflow {'on' if args.track else 'off'}", file=sys.stderr)
    for fam in sorted({FAMILY[w] for w in which}):
        lr, schedule, params = default_point(fam)
        print(f"default recipe {fam}: {schedule} {params} max_lr {lr:.3g}", file=sys.stderr)
    all_runs = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lrsearch-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for w in which:
            runs = {m: run_method(w, m, args, tmp) for m in METHODS}
            all_runs.append(runs)
            print_task(w, runs, args.budget)
            sys.stdout.flush()
    print_spearman(all_runs)
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
