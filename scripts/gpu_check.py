"""GPU checks (run where a CUDA device exists; CI has none).

1. The range test on CUDA, with and without AMP: runs, restores the model and optimizer exactly,
   and gives finite bounds; timed against the same test on the CPU.
2. A trial's model, optimizer state and schedule on the device a trial gets (``trial_device()``
   returns CUDA when Ray granted a GPU): one epoch of the trial loop's steps on EfficientNet-Lite0.

    python scripts/gpu_check.py
"""

from __future__ import annotations

import time

import torch

import lrsearch
from lrsearch.job.parse import parse_job
from lrsearch.optim.optimizers import build_optimizer
from lrsearch.range_test import forward, lr_range_test
from lrsearch.tasks import build_task, evaluate
from lrsearch.engine.trial import build_trial, trial_device


def _job(name: str) -> object:
    return parse_job({
        "name": name,
        "task": {"kind": "image_classification", "model": "efficientnet-lite0", "dataset": "digits",
                 "image_size": 64, "num_train": 1024, "num_val": 256, "batch_size": 64},
        "range_test": {"num_steps": 100, "end_lr": 1.0},
        "search": {"max_epochs": 2},
    })


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    job = _job("gpu-check")
    task = build_task(job)

    # 1. range test on CUDA (AMP off and on) vs. CPU, state restored exactly
    rows = []
    for device, amp in (("cpu", False), ("cuda", False), ("cuda", True)):
        model = task.build_model()
        optimizer = build_optimizer(job.optimizer, model, 1e-7)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = lr_range_test(model, optimizer, task.criterion, task.train_loader, num_steps=100,
                               end_lr=1.0, device=device, amp=amp)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        restored = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        on_cpu_again = next(model.parameters()).device.type == "cpu"
        low, high = result.bounds()
        rows.append((device, amp, len(result.lrs), result.stop_reason, low, high, seconds, restored, on_cpu_again))
        assert restored and on_cpu_again and 0 < low < high
    print("\n| device | amp | steps | stop | bounds low | bounds high | seconds | state restored | model back on its device |")
    print("|---|---|---:|---|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3g} | {r[5]:.3g} | {r[6]:.2f} | {r[7]} | {r[8]} |")
    cpu_s = rows[0][6]
    print(f"\nspeed-up over CPU: fp32 {cpu_s / rows[1][6]:.1f}x, AMP {cpu_s / rows[2][6]:.1f}x")

    # find_lr picks CUDA by itself when there is one
    result = lrsearch.find_lr(job, task=task, save=False)
    assert result.settings["device"] == "cuda", result.settings
    print(f"find_lr default device: {result.settings['device']}")

    # 2. a trial on the device a trial gets
    device = trial_device()
    assert device.type == "cuda"
    config = {"max_lr": 3e-3, "schedule": "one_cycle", "one_cycle": {"pct_start": 0.3, "div_factor": 25.0}}
    model, optimizer, scheduler, params = build_trial(job, task, config, device)
    assert all(p.device.type == "cuda" for p in model.parameters())
    start = time.perf_counter()
    steps = 0
    for batch in task.train_loader:
        steps += 1
        optimizer.zero_grad(set_to_none=True)
        loss = forward(model, task.criterion, batch, device)
        loss.backward()
        optimizer.step()
        scheduler.step()
    torch.cuda.synchronize()
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert states and all(t.device.type == "cuda" for t in states)
    metrics = evaluate(model, task, device)
    print(f"trial on {device}: {steps} steps in {time.perf_counter() - start:.2f} s, "
          f"lr now {optimizer.param_groups[0]['lr']:.3g}, val accuracy {metrics['accuracy']:.3f}, "
          f"params and optimizer state on cuda, peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print("GPU CHECK OK")


if __name__ == "__main__":
    main()
