"""The trial protocol: what any training loop needs to be one trial of a search.

A search hands every trial's loop a :class:`Trial`. The loop takes its optimizer and schedule from
it, trains, and calls :meth:`Trial.report` after each epoch::

    def train_fn(trial: lrsearch.Trial) -> None:
        model = build_my_model()
        optimizer = trial.optimizer(model)                  # at the trial's max_lr
        scheduler = trial.scheduler(optimizer, total_steps=len(loader) * trial.max_epochs)
        for epoch in range(trial.start_epoch, trial.max_epochs):   # > 0 when resumed
            for batch in loader:
                loss = step(model, batch)                   # backward, optimizer.step()
                scheduler.step()
            if trial.report(epoch + 1, accuracy=evaluate(model), train_loss=loss):
                break                                       # diverged, or the last epoch

    lrsearch.search("job.yaml", train_fn=train_fn)

:meth:`Trial.report` stops a diverged trial (NaN/inf, or a loss climbing past
``search.diverge_factor`` x its first), logs the epoch and the LR of every optimizer step to the
trial's MLflow run, hands the metrics to Ray Tune (where ASHA may stop the trial: Ray then ends the
loop inside ``report``, with ``SystemExit``), and saves a checkpoint at the epochs
``search.checkpoint`` names: the model's trainable weights, the optimizer, the schedule and
anything passed to :meth:`Trial.track`. A resumed trial gets them back from :meth:`Trial.optimizer`,
:meth:`Trial.scheduler` and :meth:`Trial.track`, and ``start_epoch`` says where to go on.

The built-in loop (:func:`lrsearch.engine.trial.task_loop`), the Hugging Face Trainer and the Lightning
integrations are loops on this protocol too.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrsearch.engine import Training, checkpoint_state
from lrsearch.errors import TaskError
from lrsearch.infra.tracking import TrialLogger
from lrsearch.job.config import SearchConfig
from lrsearch.job.space import schedule_params
from lrsearch.optim.optimizers import build_optimizer, for_schedule, optimizer_over
from lrsearch.optim.schedules import build_scheduler

__all__ = ["REPLAY_FILE", "Trial", "TrialPlan", "checkpoint_epochs", "flat_config", "objective_key", "worst_metric"]

#: in a checkpoint directory instead of ``trial.pt``: "rebuild this state by retraining N epochs"
REPLAY_FILE = "replay.json"

#: reported names kept as they are; any other name is a validation metric and gets ``val_``
_AS_IS = ("val_", "train_", "test_")


def objective_key(metric: str) -> str:
    """The name a reported metric goes by in results: ``accuracy`` -> ``val_accuracy``."""
    return metric if metric.startswith(_AS_IS) else f"val_{metric}"


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config as a user reads it: ``{max_lr, schedule, <its parameters>, ...}``
    (Optuna's nested ``{schedule: cosine, cosine: {warmup_frac: ...}}`` flattened)."""
    name = config["schedule"]
    flat = {k: v for k, v in config.items() if not isinstance(v, dict)}
    flat.update(config.get(name) or {})
    return flat


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a search shares: how it trains (``training``: the recipe, the optimizer
    section, the seed, the divergence stop), the epochs its budget spans, the cap on an epoch's
    optimizer steps, and the epochs after which it saves a checkpoint. The search's driver derives
    it from the job's sections (:meth:`of`)."""

    training: Training
    max_epochs: int
    max_steps_per_epoch: int | None
    checkpoint_epochs: tuple[int, ...]

    @classmethod
    def of(cls, train: Any, optimizer: Any, search: SearchConfig) -> TrialPlan:
        """From a job's ``train``, ``optimizer`` and ``search`` sections."""
        return cls(Training.of(train, optimizer, search), search.max_epochs, search.max_steps_per_epoch,
                   tuple(checkpoint_epochs(search)))


class Trial:
    """One trial of a search, as a training loop sees it.

    Attributes:
        config: ``{max_lr, schedule, <schedule parameters>, weight_decay?, layer_decay?}``; the
            schedule's parameters are fractions of the run (``warmup_frac``), as the space has them.
        max_epochs: the epochs the trial's budget spans (``search.max_epochs``).
        start_epoch: epochs already done: 0, or where a resumed trial's checkpoint left it.
        metric, mode: the objective (``val_accuracy``, ``max``) that ASHA and the search rank by.
        device: the device Ray granted (``cuda`` when it gave the trial a GPU).
        recipe: how the job trains (``train``: clipping, precision, gradient accumulation).
        seed: the search's seed (``search.seed``); an epoch's batch order comes from it and the
            epoch (:func:`lrsearch.engine.epoch_seed`).
        max_steps_per_epoch: the optimizer steps an epoch is capped at (``None``: a whole pass).
        monitor: the divergence stop; :meth:`diverging` feeds it per-step losses.
    """

    def __init__(self, config: dict[str, Any], plan: TrialPlan, *, metric: str = "val_accuracy",
                 mode: str = "max", tracking: Any = None, checkpoint: Any = None,
                 device: torch.device | None = None) -> None:
        self.metric, self.mode = objective_key(metric), mode
        self.raw_config = config
        self.config = flat_config(config)
        self.max_epochs = plan.max_epochs
        self.recipe = plan.training.recipe
        self.seed = plan.training.seed
        self.max_steps_per_epoch = plan.max_steps_per_epoch
        self.device = device or trial_device()
        self.monitor = plan.training.monitor()
        self._optimizer_cfg = plan.training.optimizer
        self.total_steps: int | None = None
        self.schedule_params: dict[str, Any] = {}
        self.diverged = False
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: Any = None
        self._tracked: dict[str, Any] = {}
        self._lrs: list[float] = []
        self._steps_before = 0  # optimizer steps of the epochs reported so far
        self._fed_losses = False
        self._epoch_started = (time.perf_counter(), time.time())
        self._checkpoint_at = set(plan.checkpoint_epochs)
        self._logger = None
        self._state, self.start_epoch, self._replay_to = _load_checkpoint(checkpoint, self.device)
        if tracking is not None:
            ids = _tune_ids()
            self._logger = TrialLogger(tracking, ids[0], ids[1])
        self._logged = self._logger.logged_epochs(self.metric) if self._logger is not None else 0
        if self._state is not None:
            if "monitor" in self._state:
                self.monitor.load_state_dict(self._state["monitor"])
            self._steps_before = int(self._state.get("steps", 0))

    # ------------------------------------------------------------------ what the loop asks for

    @property
    def max_lr(self) -> float:
        return float(self.config["max_lr"])

    @property
    def schedule(self) -> str:
        return str(self.config["schedule"])

    def optimizer(self, model_or_groups: nn.Module | Iterable, *, model: nn.Module | None = None,
                  layer_groups: Callable[[nn.Module], list[list[nn.Parameter]]] | None = None
                  ) -> torch.optim.Optimizer:
        """The job's optimizer (``optimizer.name``) at the trial's ``max_lr``.

        Give the model (weight decay skips biases and norms; ``layer_groups`` splits it for the
        trial's ``layer_decay``), or your own parameter groups: each group's peak LR is ``max_lr``
        times its ``lr_scale`` (default 1); then pass ``model=`` too, so checkpoints hold its
        weights. A resumed trial's model weights and optimizer state are loaded here.
        """
        if isinstance(model_or_groups, nn.Module):
            model = model_or_groups
        if model is not None:
            self._model = model
            if self._state is not None:
                model.load_state_dict(self._state["model"], strict=False)  # frozen weights: as built
        wd = self.config.get("weight_decay")
        cfg = for_schedule(self._optimizer_cfg, self.config["schedule"])
        if isinstance(model_or_groups, nn.Module):
            opt = build_optimizer(cfg, model_or_groups, self.max_lr, weight_decay=wd,
                                  layer_groups=layer_groups,
                                  layer_decay=float(self.config.get("layer_decay", 1.0)))
        else:
            opt = optimizer_over(cfg, _groups(model_or_groups, self.max_lr,
                                                             self._optimizer_cfg.weight_decay if wd is None else wd),
                                 self.max_lr)
        if self._state is not None and "optimizer" in self._state:
            opt.load_state_dict(self._state["optimizer"])
        opt.register_step_pre_hook(self._record_lr)
        self._optimizer = opt
        return opt

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        """The trial's schedule over ``total_steps`` optimizer steps (the whole ``max_epochs``),
        stepped once per optimizer step; its fractions become steps as the export converts them.
        A resumed trial's schedule state is loaded here."""
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise TaskError(f"trial.scheduler: total_steps got {total_steps!r}; allowed: an integer >= 1 "
                            "(the optimizer steps of all max_epochs epochs)")
        self.total_steps = total_steps
        self.schedule_params = schedule_params(self.raw_config, total_steps)
        scheduler = build_scheduler(optimizer, self.schedule, total_steps, **self.schedule_params)
        if self._state is not None and "scheduler" in self._state:
            scheduler.load_state_dict(self._state["scheduler"])
            # building the scheduler set the LR of its step 0; the checkpoint's is where it was
            for group, saved in zip(optimizer.param_groups, self._state["optimizer"]["param_groups"],
                                    strict=False):
                group["lr"] = saved["lr"]
        self._scheduler = scheduler
        if self._logger is not None and self.start_epoch == 0 and self._replay_to == 0:
            self._logger.log_config(self.raw_config, self.schedule_params)
        return scheduler

    def track(self, **objects: Any) -> None:
        """Objects with ``state_dict()`` / ``load_state_dict()`` that checkpoints also hold (a
        gradient scaler, an EMA of the weights...); a resumed trial's are loaded here."""
        for name, obj in objects.items():
            if self._state is not None and name in self._state.get("tracked", {}):
                obj.load_state_dict(self._state["tracked"][name])
            self._tracked[name] = obj

    def diverging(self, loss: float) -> bool:
        """Feed one step's training loss to the divergence stop: True once the trial has diverged
        (NaN/inf, or the smoothed loss above ``search.diverge_factor`` x its first). Report then."""
        self._fed_losses = True
        self.diverged |= self.monitor.update(float(loss))
        return self.diverged

    def replaying(self, epoch: int) -> bool:
        """Whether ``epoch`` (from 1) is retrained only to rebuild a state whose checkpoint Tune
        had replaced: :meth:`report` ignores it, so the loop may skip evaluating it."""
        return epoch <= self._replay_to

    # ------------------------------------------------------------------ report

    def report(self, epoch: int, **metrics: float) -> bool:
        """After epoch ``epoch`` (from 1): stop if diverged, log, report to Tune, checkpoint.

        ``metrics`` are validation metrics (``accuracy=``, ``loss=``: results name them
        ``val_accuracy``, ``val_loss``) unless their name starts with ``train_``; the objective
        must be there. ``diverged=True`` says the loop saw its loss diverge.

        Returns:
            True when the loop must stop: the trial diverged, or this was its last epoch. When
            ASHA stops the trial, Ray ends the loop here (``SystemExit``).
        """
        if self.replaying(epoch):
            self._next_epoch()
            return False
        diverged = bool(metrics.pop("diverged", False)) or self.diverged
        values = {objective_key(k): float(v) for k, v in metrics.items()}
        train_loss = values.get("train_loss")
        if train_loss is not None and not self._fed_losses:
            diverged |= self.monitor.update(train_loss)
        diverged |= any(not math.isfinite(v) for v in values.values())
        if not diverged and self.metric not in values:
            raise TaskError(f"trial.report: the objective {self.metric!r} is missing; reported: "
                            f"{', '.join(sorted(values)) or 'nothing'} (report it as "
                            f"{self.metric.removeprefix('val_')}=...)")
        self.diverged = diverged
        started, started_at = self._epoch_started
        out = {"epoch": epoch, "train_loss": train_loss if train_loss is not None else float("nan"),
               "lr": self._peak_lr(), "total_steps": self.total_steps or 0, "diverged": diverged,
               "epoch_started_at": started_at, **_node(), **values}
        if diverged:
            out.update({self.metric: worst_metric(self.metric, self.mode), "val_loss": 1e9})
            if train_loss is None or not math.isfinite(train_loss):
                out["train_loss"] = 1e9
        out["train_seconds"] = time.perf_counter() - started
        self._log(epoch, out)
        checkpoint = epoch in self._checkpoint_at and not diverged
        self._next_epoch()
        self._tune_report(out, epoch if checkpoint else None)
        return diverged or epoch >= self.max_epochs

    # ------------------------------------------------------------------ internals

    def _record_lr(self, optimizer, args, kwargs) -> None:  # optimizer step pre-hook
        self._lrs.append(max(float(g["lr"]) for g in optimizer.param_groups))

    def _peak_lr(self) -> float:
        if self._optimizer is None:
            return float("nan")
        return max(float(g["lr"]) for g in self._optimizer.param_groups)

    def _next_epoch(self) -> None:
        self._steps_before += len(self._lrs)
        self._lrs = []
        self._epoch_started = (time.perf_counter(), time.time())

    def _log(self, epoch: int, out: dict[str, Any]) -> None:
        if self._logger is None or epoch <= self._logged:
            return
        keys = [self.metric, "val_loss", "train_loss", "lr"]
        logged = {k: out[k] for k in keys if k in out and isinstance(out[k], float) and math.isfinite(out[k])}
        if out["diverged"]:
            logged = {k: v for k, v in logged.items() if k in ("train_loss",)} | {"diverged": 1.0}
        self._logger.log_epoch(epoch, logged, self._lrs, self._steps_before)

    def state(self, epoch: int) -> dict[str, Any]:
        """What a checkpoint after ``epoch`` holds (a finished trial's: the weights only)."""
        return checkpoint_state(epoch, model=self._model, optimizer=self._optimizer, scheduler=self._scheduler,
                                monitor=self.monitor, tracked=self._tracked, steps=self._steps_before,
                                finished=epoch >= self.max_epochs)

    def _tune_report(self, out: dict[str, Any], checkpoint_epoch: int | None) -> None:
        from ray import tune

        if checkpoint_epoch is None:
            tune.report(out)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trial.pt")
            torch.save(self.state(checkpoint_epoch), path)
            out["checkpoint_bytes"] = os.path.getsize(path)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(tmp))


def trial_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it granted this trial; none granted -> CPU.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _groups(groups: Iterable, lr: float, weight_decay: float) -> list[dict]:
    out = []
    for group in groups:
        group = dict(group) if isinstance(group, dict) else {"params": [group]}
        group["params"] = list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]]
        group["lr"] = lr * float(group.pop("lr_scale", 1.0))
        group.setdefault("weight_decay", weight_decay)
        out.append(group)
    if not out:
        raise TaskError("trial.optimizer: got no parameter groups; allowed: a model, or parameter groups")
    return out


def worst_metric(metric: str, mode: str) -> float:
    """What a diverged trial reports: finite (Optuna and ASHA rank it last), never NaN."""
    if metric == "val_accuracy":
        return 0.0
    return -1e9 if mode == "max" else 1e9


def checkpoint_epochs(s: SearchConfig) -> list[int]:
    """The epochs after which a trial saves a checkpoint, by ``search.checkpoint``.

    ``rungs``: where ASHA judges trials (``grace_period`` x ``reduction_factor``^k), or epochs 1, 2,
    4, 8... without ASHA, so a search writes O(log max_epochs) checkpoints per trial and resume
    loses at most the epochs since the last one. The last epoch's checkpoint (weights only: the
    trial is done) is written only when ``keep_checkpoints`` keeps something.
    """
    last = [s.max_epochs] if s.keep_checkpoints != "none" else []
    if s.checkpoint == "none":
        return last
    if s.checkpoint == "epoch":
        return list(range(1, s.max_epochs + 1))
    start, factor = (s.grace_period, s.reduction_factor) if s.early_stopping == "asha" else (1, 2)
    rungs, epoch = set(), float(start)
    while epoch < s.max_epochs:
        rungs.add(int(epoch))
        epoch *= factor
    return sorted(rungs | set(last))


def _tune_ids() -> tuple[str, str]:
    from ray import tune

    context = tune.get_context()
    return context.get_trial_id(), context.get_trial_name()


def _node() -> dict[str, str]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def _load_checkpoint(checkpoint: Any, device: torch.device) -> tuple[dict | None, int, int]:
    """``(state, first epoch to train, epochs to retrain unreported)`` from a Tune checkpoint."""
    if checkpoint is None:
        return None, 0, 0
    import json

    with checkpoint.as_directory() as path:
        if os.path.isfile(os.path.join(path, REPLAY_FILE)):
            # the search's saved state points at a checkpoint Tune had already replaced: retrain
            # the epochs it covered (seeded per epoch, so the same trajectory) without reporting
            with open(os.path.join(path, REPLAY_FILE)) as f:
                return None, 0, int(json.load(f)["epoch"])
        state = torch.load(os.path.join(path, "trial.pt"), map_location=device, weights_only=False)
    return state, int(state["epoch"]), 0
