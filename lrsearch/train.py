"""One trial: fine-tune the task's pretrained model with the trial's LR strategy, report per epoch.

:func:`run_trial` is the Ray Tune trainable (a function trainable; everything it receives pickles).
It builds the task on the worker, the optimizer at ``max_lr`` and the schedule over the trial's
full budget (``max_epochs`` epochs), trains, evaluates after every epoch and reports the metric,
train loss and LR with a checkpoint, so an interrupted search resumes where each trial stopped.
(Where the search's saved state names a checkpoint Tune had already replaced, the resume leaves
a ``replay.json`` in its place and the trial retrains those epochs, unreported, before going on.)
A NaN/inf loss, or a smoothed loss above ``explode_factor`` x its starting value, stops the trial
at once: it reports ``diverged=True`` and the worst metric value, and ends (the search goes on).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import torch

from lrsearch.config import JobConfig
from lrsearch.optim import build_optimizer
from lrsearch.range_test import forward
from lrsearch.schedules import build_scheduler
from lrsearch.space import schedule_params
from lrsearch.tasks import Task, build_task, evaluate, reseed
from lrsearch.tracking import TrackingInfo, TrialLogger

_TASKS: dict[str, Task] = {}

#: in a checkpoint directory instead of ``trial.pt``: "rebuild this state by retraining N epochs"
REPLAY_FILE = "replay.json"


def metric_key(task: Task) -> str:
    """The name of the metric trials report and the search optimises, e.g. ``val_accuracy``."""
    return f"val_{task.metric}"


def worst_value(task: Task) -> float:
    """What a diverged trial reports: finite (Optuna and ASHA rank it last), never NaN."""
    if task.metric == "accuracy":
        return 0.0
    return -1e9 if task.mode == "max" else 1e9


def _task(job: JobConfig) -> Task:
    # One build per worker process and job: loading a pretrained model and tokenising take seconds.
    key = job.model_dump_json()
    if key not in _TASKS:
        _TASKS.clear()
        _TASKS[key] = build_task(job)
    return _TASKS[key]


def steps_per_epoch(job: JobConfig, task: Task) -> int:
    n = len(task.train_loader)
    cap = job.search.max_steps_per_epoch
    return min(n, cap) if cap else n


def trial_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it granted this trial; none granted -> CPU.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_trial(job: JobConfig, task: Task, config: dict[str, Any], device: torch.device):
    """Model, optimizer and scheduler for one trial config (also used to replay a best config)."""
    total = steps_per_epoch(job, task) * job.search.max_epochs
    model = task.build_model().to(device)
    optimizer = build_optimizer(
        job.optimizer,
        model,
        float(config["max_lr"]),
        weight_decay=config.get("weight_decay"),
        layer_groups=task.layer_groups,
        layer_decay=float(config.get("layer_decay", 1.0)),
    )
    params = schedule_params(config, total)
    scheduler = build_scheduler(optimizer, config["schedule"], total, **params)
    return model, optimizer, scheduler, params, total


def run_trial(config: dict[str, Any], job: JobConfig, tracking: TrackingInfo | None = None) -> None:
    """Ray Tune trainable: one trial of the search (logged to its own nested MLflow run)."""
    from ray import tune

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    task = _task(job)
    device = trial_device()
    torch.manual_seed(job.search.seed)
    model, optimizer, scheduler, params, total = build_trial(job, task, config, device)
    per_epoch = steps_per_epoch(job, task)
    key = metric_key(task)
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    smooth, explode = 0.1, job.search.explode_factor

    logger = None
    if tracking is not None:
        context = tune.get_context()
        logger = TrialLogger(tracking, context.get_trial_id(), context.get_trial_name())
        logger.log_config(config, params)
    logged = logger.logged_epochs(key) if logger is not None else 0

    start_epoch, replay_to, reference, avg, seen = 0, 0, None, 0.0, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            if os.path.isfile(os.path.join(path, REPLAY_FILE)):
                # the search's saved state points at a checkpoint Tune had already replaced: retrain
                # the epochs it covered (seeded per epoch, so the same trajectory) without reporting
                with open(os.path.join(path, REPLAY_FILE)) as f:
                    replay_to = int(json.load(f)["epoch"])
            else:
                state = torch.load(os.path.join(path, "trial.pt"), map_location=device, weights_only=False)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                start_epoch, reference, avg, seen = state["epoch"], state["reference"], state["avg"], state["seen"]

    for epoch in range(start_epoch, job.search.max_epochs):
        replaying = epoch < replay_to
        # each epoch's batch order depends on the seed and the epoch only: not on which trials this
        # (reused) worker ran before, nor on whether the trial was resumed from a checkpoint
        reseed(task, job.search.seed * 1_000_003 + epoch)
        started = time.perf_counter()
        model.train()
        loss_sum, steps, diverged, lrs = 0.0, 0, False, []
        for batch in task.train_loader:
            if steps >= per_epoch:
                break
            lrs.append(max(float(g["lr"]) for g in optimizer.param_groups))  # the peak group
            optimizer.zero_grad(set_to_none=True)
            loss = forward(model, task.criterion, batch, device)
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = True
                break
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
            seen += 1
            loss_sum += value
            avg = (1 - smooth) * avg + smooth * value
            smoothed = avg / (1 - (1 - smooth) ** seen)
            if reference is None:
                reference = value
            if smoothed > explode * reference:
                diverged = True
                break
        if replaying and not diverged:
            continue
        train_loss = loss_sum / max(1, steps)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss if math.isfinite(train_loss) else 1e9,
            "lr": max(float(g["lr"]) for g in optimizer.param_groups),
            "total_steps": total,
            "train_seconds": time.perf_counter() - started,
            "diverged": diverged,
            "node_id": node_id,
        }
        if diverged:
            metrics[key] = worst_value(task)
            metrics["val_loss"] = 1e9
            if logger is not None and epoch + 1 > logged:
                logger.log_epoch(epoch + 1, {"train_loss": metrics["train_loss"], "diverged": 1.0},
                                 lrs, epoch * per_epoch)
            tune.report(metrics)
            return
        val = evaluate(model, task, device)
        metrics.update({f"val_{k}": v for k, v in val.items()})
        metrics["train_seconds"] = time.perf_counter() - started
        if logger is not None and epoch + 1 > logged:
            logger.log_epoch(epoch + 1, {k: metrics[k] for k in (key, "val_loss", "train_loss", "lr")},
                             lrs, epoch * per_epoch)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "reference": reference,
                 "avg": avg, "seen": seen},
                os.path.join(tmp, "trial.pt"),
            )
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
