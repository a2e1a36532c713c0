"""Range-test cost: lrsearch vs. the same number of plain training steps vs. torch-lr-finder.

Same model, data, optimizer and number of steps for all three, interleaved in one run and repeated,
so machine noise hits them alike. Prints a Markdown table (copied into BENCHMARKS.md).

    .venv/bin/python bench/range_test_overhead.py [--repeats 5] [--steps 100]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time

import torch

from lrsearch.range_test import lr_range_test
from lrsearch.tasks import synthetic_task

NO_DIVERGE = 1e12  # run every step so that all three do the same work


def plain(task, steps: int) -> float:
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = iter(task.train_loader)
    start = time.perf_counter()
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(task.train_loader)
            x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = task.criterion(model(x), y)
        loss.backward()
        opt.step()
        float(loss.detach())  # the range test reads every loss too
    return time.perf_counter() - start


def ours(task, steps: int) -> float:
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    result = lr_range_test(model, opt, task.criterion, task.train_loader, num_steps=steps,
                           end_lr=1e-1, diverge_factor=NO_DIVERGE)
    assert len(result.lrs) == steps
    return time.perf_counter() - start


def torch_lr_finder(task, steps: int) -> float | None:
    try:
        from torch_lr_finder import LRFinder
    except ImportError:
        return None
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        finder = LRFinder(model, opt, task.criterion, device="cpu")
        finder.range_test(task.train_loader, end_lr=1e-1, num_iter=steps, diverge_th=NO_DIVERGE)
        finder.reset()
    assert len(finder.history["lr"]) == steps
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    configs = {
        "MLP 32-64-64-8 (13 k params), batch 64": dict(hidden=64),
        "MLP 256-1024-1024-8 (1.3 M params), batch 64": dict(hidden=1024, num_features=256),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, "
          f"median of {args.repeats} interleaved repeats\n", file=sys.stderr)
    print("| model | plain steps (s) | lrsearch range test (s) | torch-lr-finder (s) "
          "| lrsearch / plain | lrsearch / torch-lr-finder |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, cfg in configs.items():
        task = synthetic_task(num_train=4096, **cfg)
        times: dict[str, list[float]] = {"plain": [], "ours": [], "tlf": []}
        for _ in range(args.repeats):
            times["plain"].append(plain(task, args.steps))
            times["ours"].append(ours(task, args.steps))
            t = torch_lr_finder(task, args.steps)
            if t is not None:
                times["tlf"].append(t)
        p, o = statistics.median(times["plain"]), statistics.median(times["ours"])
        tlf = statistics.median(times["tlf"]) if times["tlf"] else None
        tlf_s = f"{tlf:.3f}" if tlf else "not installed"
        ratio = f"{o / tlf:.2f}" if tlf else "-"
        print(f"| {label} | {p:.3f} | {o:.3f} | {tlf_s} | {o / p:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
