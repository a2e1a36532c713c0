"""Bytes of trial checkpoints written per trial-epoch, before and after ``search.checkpoint``.

Before (lrsearch up to 0.1.0 at commit 3843ef5): every epoch of every trial saved the whole model's
state_dict, the optimizer's and the scheduler's. That is measured here at the torch level on the
same model, after one AdamW step (so the optimizer holds its moment estimates).

After: real searches through the public API, 3 trials x 4 epochs each (no early stopping, so every
policy sees the same epochs), reading each trial's ``checkpoint_bytes``: ``rungs`` (the default:
epochs 1, 2 and the last), ``epoch`` and ``none``. A checkpoint holds the trainable part only (frozen
weights come back from the task's model factory), and the last epoch's holds no optimizer state
(a finished trial does not resume); with ``keep_checkpoints: best`` that last one is what the best
trial keeps.

    .venv/bin/python bench/checkpoint_bytes.py
"""

from __future__ import annotations

import io
import shutil
import tempfile

import torch

import lrsearch
from lrsearch.optim.optimizers import build_optimizer
from lrsearch.optim.schedules import build_scheduler

TASKS = {
    "MiniLM-L6 (fortunes)": {"kind": "text_classification", "model": "minilm-l6", "dataset": "fortunes",
                             "categories": ["computers", "food", "law", "science"], "num_train": 64,
                             "num_val": 32, "max_length": 32, "batch_size": 16},
    "EfficientNet-Lite0 (digits)": {"kind": "image_classification", "model": "efficientnet-lite0",
                                    "dataset": "digits", "image_size": 32, "num_train": 64, "num_val": 32,
                                    "batch_size": 16},
}
POLICIES = ("rungs", "epoch", "none")


def before_bytes(task_cfg: dict) -> int:
    """One epoch's checkpoint as the old trial loop wrote it: model + optimizer + scheduler."""
    job = lrsearch.load_job({"name": "b", "task": task_cfg})
    from lrsearch.optim.batches import forward
    from lrsearch.tasks import build_task

    task = build_task(job)
    model = task.build_model()
    optimizer = build_optimizer(job.optimizer, model, 1e-4)
    scheduler = build_scheduler(optimizer, "linear", 100)
    batch = next(iter(task.train_loader))
    forward(model, task.criterion, batch, "cpu").backward()
    optimizer.step()
    scheduler.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buf)
    return buf.tell()


def after_bytes(task_cfg: dict, policy: str) -> tuple[float, int]:
    storage = tempfile.mkdtemp(prefix="lrsearch-ckpt-")
    try:
        res = lrsearch.search({
            "name": f"ckpt-{policy}", "task": task_cfg, "range_test": {"enabled": False},
            "space": {"max_lr": {"low": 1e-5, "high": 1e-4, "log": True}, "schedules": ["linear"]},
            "search": {"num_trials": 3, "max_epochs": 4, "early_stopping": "none", "checkpoint": policy,
                       "max_concurrent_trials": 2},
            "storage": {"path": storage},
        }, track=False)
        written = sum(t.checkpoint_bytes for t in res.trials)
        return written / res.trial_epochs, res.trial_epochs
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def main() -> None:
    rows = []
    for name, cfg in TASKS.items():
        before = before_bytes(cfg)
        rows.append((name, "before: model + optimizer every epoch", before, 1.0))
        for policy in POLICIES:
            per_epoch, _ = after_bytes(cfg, policy)
            rows.append((name, f"after: checkpoint: {policy}", per_epoch, per_epoch / before))
    print("| task | policy | MB written per trial-epoch | vs before |\n|---|---|---:|---:|")
    for name, policy, b, ratio in rows:
        print(f"| {name} | {policy} | {b / 2**20:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
