"""Range-test bounds vs. an LR grid: does ``RangeTestResult.bounds()`` bracket the LR that trains best?

For each task (MiniLM-L6 on fortunes, EfficientNet-Lite0 on Fashion-MNIST; small subsets, CPU) this
runs the job's range test through ``lrsearch.find_lr``, then trains a fresh, seeded model at every LR of a
log-spaced grid for a short fixed budget (AdamW, linear decay with 10 % warmup) and evaluates it on
the validation set. The grid's best LR is the one with the highest validation accuracy (ties: lower
validation loss). Prints one Markdown table per task and a summary table (copied into BENCHMARKS.md).

    .venv/bin/python bench/bounds_vs_grid.py [--task text|image|all] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np
import torch

import lrsearch
from lrsearch.job.config import JobConfig
from lrsearch.job.parse import parse_job
from lrsearch.optim.batches import forward
from lrsearch.optim.optimizers import build_optimizer
from lrsearch.optim.schedules import build_scheduler
from lrsearch.range_test import SUGGESTION_METHODS, RangeTestResult
from lrsearch.tasks import Task, build_task, evaluate

SEED = 0
THREADS = 2

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


def make_job(which: str, *, quick: bool, num_steps: int) -> JobConfig:
    task = dict(TASKS[which])
    if quick:
        task.update(QUICK_SIZES[which])
    return parse_job({
        "name": f"bounds-vs-grid-{which}",
        "task": task,
        "optimizer": {"name": "adamw", "weight_decay": 0.01},
        "range_test": {"start_lr": 1e-7, "end_lr": 1.0, "num_steps": num_steps},
    }, source=f"bench:{which}")


def log_grid(low_exp: float, high_exp: float, per_decade: int) -> list[float]:
    n = round((high_exp - low_exp) * per_decade) + 1
    return [float(10 ** e) for e in np.linspace(low_exp, high_exp, n)]


def train_at(job: JobConfig, task: Task, lr: float, epochs: int) -> dict[str, float]:
    """Train a fresh seeded model at peak ``lr`` for ``epochs``; validation loss and accuracy."""
    torch.manual_seed(SEED)
    model = task.build_model()
    # every grid point sees the same batches in the same order
    generator = getattr(task.train_loader, "generator", None)
    if generator is not None:
        generator.manual_seed(SEED)
    opt = build_optimizer(job.optimizer, model, lr)
    total = epochs * len(task.train_loader)
    sched = build_scheduler(opt, "linear", total, warmup_frac=0.1)
    model.train()
    finite = True
    for _ in range(epochs):
        for batch in task.train_loader:
            opt.zero_grad(set_to_none=True)
            loss = forward(model, task.criterion, batch, "cpu")
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            opt.step()
            sched.step()
        if not finite:
            break
    metrics = evaluate(model, task)
    if not finite or not math.isfinite(metrics["loss"]):
        metrics = {"loss": math.inf, "accuracy": metrics["accuracy"]}
    return metrics


def best_lr(scores: dict[float, dict[str, float]]) -> float:
    return min(scores, key=lambda lr: (-scores[lr]["accuracy"], scores[lr]["loss"]))


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def run_task(which: str, args: argparse.Namespace) -> dict[str, Any]:
    job = make_job(which, quick=args.quick, num_steps=args.steps)
    task = build_task(job)
    print(f"[{which}] {task.name}: {len(task.train_loader)} train batches/epoch", file=sys.stderr)

    start = time.perf_counter()
    result = lrsearch.find_lr(job, task=task, save=False)
    rt_seconds = time.perf_counter() - start
    bounds = result.bounds()
    print(f"[{which}] range test {rt_seconds:.1f} s, {len(result.lrs)} steps ({result.stop_reason}), "
          f"bounds {bounds[0]:.3g}..{bounds[1]:.3g}", file=sys.stderr)

    grid = log_grid(args.grid_low, args.grid_high, args.per_decade)
    scores: dict[float, dict[str, float]] = {}
    start = time.perf_counter()
    for lr in grid:
        t0 = time.perf_counter()
        scores[lr] = train_at(job, task, lr, args.epochs)
        print(f"[{which}] lr {lr:.2g}: acc {scores[lr]['accuracy']:.3f} loss {scores[lr]['loss']:.3f} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    grid_seconds = time.perf_counter() - start
    rt_steps = len(result.lrs) + (result.stop_reason == "non_finite")
    grid_steps = len(grid) * args.epochs * len(task.train_loader)
    return {"rt_steps": rt_steps, "grid_steps": grid_steps, "which": which, "task": task.name, "result": result, "bounds": bounds,
            "rt_seconds": rt_seconds, "grid": scores, "grid_seconds": grid_seconds,
            "best": best_lr(scores), "job": job}


def print_grid_table(row: dict[str, Any]) -> None:
    low, high = row["bounds"]
    print(f"\n**{row['task']}** (bounds {low:.2g} .. {high:.2g})\n")
    print("| grid LR | val accuracy | val loss | in bounds |")
    print("|---:|---:|---:|:---:|")
    for lr, m in row["grid"].items():
        mark = " **(best)**" if lr == row["best"] else ""
        inside = "yes" if low <= lr <= high else ""
        print(f"| {lr:.2g}{mark} | {m['accuracy']:.3f} | {m['loss']:.3f} | {inside} |")


def print_summary(rows: list[dict[str, Any]]) -> None:
    print("\n| task | range test stop (steps) | " + " | ".join(SUGGESTION_METHODS)
          + " | bounds (low, high) | grid best LR (acc) | bracketed | range test (s) | grid (s) "
          "| range test / grid (time) | range test / grid (optimizer steps) |")
    print("|---|---|" + "---:|" * len(SUGGESTION_METHODS) + "---|---|:---:|---:|---:|---:|---:|")
    for row in rows:
        result: RangeTestResult = row["result"]
        sugg = result.suggestions()
        low, high = row["bounds"]
        best = row["best"]
        inside = "yes" if low <= best <= high else "**no**"
        print(f"| {row['task']} | {result.stop_reason} ({len(result.lrs)}) | "
              + " | ".join(fmt(sugg[m]) for m in SUGGESTION_METHODS)
              + f" | {low:.2g}, {high:.2g} | {best:.2g} ({row['grid'][best]['accuracy']:.3f}) | {inside} "
              f"| {row['rt_seconds']:.1f} | {row['grid_seconds']:.1f} "
              f"| {row['rt_seconds'] / row['grid_seconds']:.2f} "
              f"| {row['rt_steps']}/{row['grid_steps']} = {row['rt_steps'] / row['grid_steps']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("text", "image", "all"), default="all")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny subsets, 30 range-test steps, 1 epoch, 5 grid points")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if args.quick:
        args.steps, args.epochs, args.grid_low, args.grid_high, args.per_decade = 30, 1, -6, -2, 1
    else:
        args.steps, args.epochs, args.grid_low, args.grid_high, args.per_decade = 100, 2, -6, -2, 2
    which = ("text", "image") if args.task == "all" else (args.task,)
    grid = log_grid(args.grid_low, args.grid_high, args.per_decade)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; range test "
          f"1e-07 -> 1, {args.steps} steps; grid {len(grid)} LRs {grid[0]:.0e} .. {grid[-1]:.0e}, "
          f"{args.epochs} epochs, AdamW (wd 0.01), linear schedule with 10 % warmup, seed {SEED}",
          file=sys.stderr)
    rows = []
    for w in which:
        rows.append(run_task(w, args))
        print_grid_table(rows[-1])
    print_summary(rows)


if __name__ == "__main__":
    main()
