"""Search a Lightning ``LightningModule`` and ``LightningDataModule`` as you wrote them.

::

    import lightning as L
    from lrsearch.integrations import lightning as lrs_pl

    def make_module() -> L.LightningModule:            # your code, unchanged
        return MyClassifier(backbone=load_pretrained())   # logs val_accuracy in validation_step

    result = lrs_pl.search("job.yaml", make_module, MyDataModule)   # or a job dict
    result.best                                        # BestConfig(schedule=..., max_lr=...)

Each trial builds your module and datamodule, puts the trial's optimizer and schedule (stepped
every optimizer step, over the trial's whole budget of ``search.max_epochs`` epochs) in place of
the module's ``configure_optimizers``, and fits them with a ``lightning.Trainer`` whose recipe is the
job's ``train`` section (gradient clipping, precision, accumulation). A callback hands every
epoch's logged metrics (``trainer.callback_metrics``) to ASHA and feeds each step's training loss to
the divergence stop. The range test runs first on a fresh module from your factory: its
``training_step`` loss over your datamodule's train dataloader.

Metric names: ``val_x``, ``val/x``, ``valid_x`` and ``validation_x`` are the validation metric
``x``; ``train_x`` / ``train/x`` training metrics; a bare name (``accuracy``) is a validation
metric, as :meth:`lrsearch.Trial.report` has it; Lightning's ``_epoch`` suffix is dropped, and
``acc`` also answers to ``accuracy``. The objective defaults to ``accuracy`` (max).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lrsearch import engine
from lrsearch.engine.protocol import Trial
from lrsearch.engine.trial import _ship_by_value
from lrsearch.errors import ConfigError, TaskError
from lrsearch.job.extras import require
from lrsearch.job.parse import load_job
from lrsearch.optim.batches import model_loss
from lrsearch.optim.optimizers import eval_mode, train_mode
from lrsearch.optim.recipe import autocast_for
from lrsearch.output.results import SearchResult
from lrsearch.tasks.base import Task
from lrsearch.tuning.runner import run_search

# Lightning is an extra: without it, importing this module fails with the pip install that brings it
pl = require("lightning.pytorch", what="lrsearch.integrations.lightning")

__all__ = ["search"]

#: the job's ``train.precision`` in Lightning's names
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}

#: name prefixes of validation metrics, as modules log them
_VAL_PREFIXES = ("val_", "valid_", "validation_")


def search(job: Any, module_factory: Callable[[], pl.LightningModule],
           datamodule_factory: Callable[[], pl.LightningDataModule], *, range_test: bool = True,
           metric: str | None = None, mode: str | None = None, **options: Any) -> SearchResult:
    """Search the learning-rate strategy of a LightningModule on a LightningDataModule.

    Args:
        job: the job (a path, dict or JobConfig); its ``task`` section may be left out. Its
            ``train`` section is the Trainer's recipe: ``max_grad_norm`` (gradient clipping),
            ``precision`` (``fp32``, ``bf16``, ``fp16``: Lightning's ``32-true``, ``bf16-mixed``,
            ``16-mixed``) and ``gradient_accumulation_steps``.
        module_factory: a zero-argument function returning a fresh ``LightningModule`` (pretrained
            weights loaded) on each call; its ``training_step`` returns the loss (automatic
            optimization) and its validation logs the objective. ``configure_optimizers`` is
            replaced by the trial's optimizer and schedule.
        datamodule_factory: a zero-argument function (or the class) returning a
            ``LightningDataModule`` with ``train_dataloader`` (of known length) and
            ``val_dataloader``. Both factories may be defined anywhere (a notebook, a script): they
            are shipped to the Ray workers by value.
        range_test: run the LR range test first (a fresh module's ``training_step`` loss over the
            train dataloader); the job's ``range_test.enabled: false`` turns it off too.
        metric, mode: the objective, as the module logs it (``accuracy`` for ``val_accuracy``);
            default ``accuracy``, ``max`` (``min`` for a name with ``loss``).
        **options: passed to :func:`lrsearch.search` (``num_trials``, ``track``, ``resume``,
            ``address``...).

    Returns:
        The :class:`~lrsearch.SearchResult` (``.best``, ``.trials``, ``.range_test``).

    Raises:
        ConfigError: a factory that is not callable or does not return a LightningModule /
            LightningDataModule, or a module with manual optimization. All before anything trains.
    """
    for name in ("task", "train_fn"):
        if name in options:
            raise ConfigError(f"{name}: not an option of the Lightning integration; it builds the "
                              "trials' loop and the range test's task from the module and datamodule")
    job = load_job(job)
    # once on the driver, so that a wrong factory fails here, before anything trains
    module, datamodule = _build(module_factory, datamodule_factory, ConfigError)
    for factory in (module_factory, datamodule_factory):
        _ship_by_value(factory)
    if not range_test:
        job = job.model_copy(update={"range_test": job.range_test.model_copy(update={"enabled": False})})
    task = RangeTestTask(module_factory, datamodule_factory, module, datamodule) \
        if job.range_test.enabled else None
    train_fn = functools.partial(train_trial, module_factory, datamodule_factory)
    train_fn.__qualname__ = f"lightning:{type(module).__name__}"  # the search's name in MLflow
    del module, datamodule  # each trial builds its own
    return run_search(job, train_fn=train_fn, task=task, metric=metric, mode=mode, **options)


# ---------------------------------------------------------------------------------------- trials


def train_trial(module_factory: Callable[[], pl.LightningModule],
                datamodule_factory: Callable[[], pl.LightningDataModule], trial: Trial) -> None:
    """One trial: the user's module and datamodule fitted by a Trainer with the trial's optimizer,
    schedule, recipe and epochs (the ones left, when resumed), each epoch reported."""
    remaining = trial.max_epochs - trial.start_epoch
    if remaining < 1:
        return
    module, datamodule = _build(module_factory, datamodule_factory, TaskError)
    recipe = trial.recipe
    try:
        autocast_for(recipe.precision, trial.device)  # fp16 off CUDA fails as the built-in loop's
    except ValueError as exc:
        raise TaskError(str(exc)) from exc
    # an instance attribute: Lightning calls (and checks) module.configure_optimizers
    module.configure_optimizers = functools.partial(configure_optimizers, trial, module)
    cap, accumulate = trial.max_steps_per_epoch, recipe.accumulation_steps
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available: ..." per trial
    trainer = pl.Trainer(
        accelerator="gpu" if trial.device.type == "cuda" else "cpu", devices=1,
        max_epochs=remaining, limit_train_batches=cap * accumulate if cap else None,
        precision=PRECISION[recipe.precision], gradient_clip_val=recipe.max_grad_norm,
        gradient_clip_algorithm="norm", accumulate_grad_batches=accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Reporter(trial)])
    torch.manual_seed(epoch_seed(trial, trial.start_epoch))  # the first epoch's batch order
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=datamodule)


def configure_optimizers(trial: Trial, module: pl.LightningModule) -> dict[str, Any]:
    """The module's ``configure_optimizers`` in a trial: the trial's optimizer (a resumed trial's
    weights and state loaded) and schedule over the whole budget, stepped per optimizer step."""
    trainer = module.trainer
    steps = trainer.estimated_stepping_batches  # of the epochs this Trainer trains: the ones left
    if not math.isfinite(steps):
        raise TaskError("datamodule_factory: the train dataloader has no length (an iterable "
                        "dataset?); the schedule needs the number of optimizer steps per epoch")
    per_epoch = int(steps) // max(1, trainer.max_epochs)
    optimizer = trial.optimizer(module)
    scheduler = trial.scheduler(optimizer, per_epoch * trial.max_epochs)
    scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed: resumed with the trial
    if scaler is not None:
        trial.track(grad_scaler=scaler)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def epoch_seed(trial: Trial, epoch: int) -> int:
    """The seed of an epoch (from 0): its batch order depends on the search's seed and the epoch
    only, not on what the worker ran before, nor on whether the trial was resumed."""
    return engine.epoch_seed(trial.seed, epoch)


class Reporter(pl.Callback):
    """Every training epoch (after its validation) to ``trial.report``; every step's training loss
    to the divergence stop; the Trainer stopped when the trial must stop."""

    def __init__(self, trial: Trial) -> None:
        self.trial = trial
        self.done = False
        self.loss_sum, self.num_losses = 0.0, 0

    def epoch(self, trainer: pl.Trainer) -> int:
        return self.trial.start_epoch + trainer.current_epoch + 1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:  # the first epoch's loader was made before this hook
            torch.manual_seed(epoch_seed(self.trial, self.trial.start_epoch + trainer.current_epoch))
        self.loss_sum, self.num_losses = 0.0, 0

    # schedule-free AdamW (the schedule_free arm, adamw_schedulefree) validates at its averaged
    # weights and trains at its own: switch around validation, as the HF Trainer does
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            eval_mode(optimizer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            train_mode(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.done or not isinstance(loss, torch.Tensor):
            return  # a skipped step (training_step returned None)
        # Lightning divides the loss by the batches it accumulates; the batch's own
        value = float(loss.detach()) * trainer.accumulate_grad_batches
        self.loss_sum, self.num_losses = self.loss_sum + value, self.num_losses + 1
        if self.trial.diverging(value):
            self.done = trainer.should_stop = True
            self.trial.report(self.epoch(trainer), train_loss=value, diverged=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done:
            return
        epoch = self.epoch(trainer)
        if self.trial.replaying(epoch):
            self.trial.report(epoch)
            return
        metrics = reported_metrics(trainer.callback_metrics)
        if "train_loss" not in metrics and self.num_losses:
            metrics["train_loss"] = self.loss_sum / self.num_losses
        objective = self.trial.metric
        if objective not in metrics and not self.trial.diverged:
            raise TaskError(f"the objective {objective!r} is not among the metrics the module logged "
                            f"({', '.join(sorted(metrics)) or 'none'}); log it in validation_step "
                            f"(self.log({objective!r}, ...)), or pass metric= (one of these, without "
                            "'val_') to lrsearch.integrations.lightning.search")
        if self.trial.report(epoch, **metrics):
            self.done = trainer.should_stop = True


def reported_metrics(logged: Mapping[str, Any]) -> dict[str, float]:
    """What a module logged, named as the trial protocol names results (``val_accuracy``,
    ``train_loss``); a name with an explicit prefix wins over a bare one (``val_loss`` over
    ``loss``)."""
    scalars = {}
    for name, value in logged.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            scalars[name.replace("/", "_")] = float(value)
    out: dict[str, float] = {}
    ranked = sorted(scalars.items(), key=lambda kv: kv[0].startswith(("train_", "test_", *_VAL_PREFIXES)))
    for name, value in ranked:
        if name.endswith("_step") and f"{name[:-5]}_epoch" in scalars:
            continue  # logged with on_step and on_epoch: the epoch's value counts
        name = name.removesuffix("_epoch")
        for prefix in _VAL_PREFIXES:
            if name.startswith(prefix):
                name = name.removeprefix(prefix)
                break
        key = name if name.startswith(("train_", "test_")) else f"val_{name}"
        out[key] = value
    for prefix in ("val_", "train_", "test_"):
        if f"{prefix}acc" in out:
            out.setdefault(f"{prefix}accuracy", out[f"{prefix}acc"])
    return out


# ------------------------------------------------------------------------------------ range test


class RangeTestTask:
    """The range test's task (an ``lrsearch.Task`` factory, called on the driver): a fresh module's
    ``training_step`` loss over the datamodule's train dataloader. It starts from the module and
    datamodule the driver's check built, which it never pickles (Ray ships only the factories)."""

    def __init__(self, module_factory: Callable[[], pl.LightningModule],
                 datamodule_factory: Callable[[], pl.LightningDataModule],
                 module: pl.LightningModule | None = None,
                 datamodule: pl.LightningDataModule | None = None) -> None:
        self.module_factory, self.datamodule_factory = module_factory, datamodule_factory
        self._built = (module, datamodule) if module is not None and datamodule is not None else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_built": None}

    def __call__(self) -> Task:
        built, self._built = self._built, None
        module, datamodule = built or _build(self.module_factory, self.datamodule_factory, TaskError)
        datamodule.prepare_data()
        datamodule.setup("fit")
        train = datamodule.train_dataloader()
        val = datamodule.val_dataloader() if _overrides(datamodule, "val_dataloader") else train
        return Task(name=type(module).__name__, build_model=StepModels(self.module_factory, module),
                    train_loader=NoTargets(train), val_loader=NoTargets(val), criterion=model_loss,
                    metric="loss", mode="min")


class StepModels:
    """The range test task's ``build_model``: the module given first, then fresh ones from the
    factory, each wrapped as a :class:`TrainingStepLoss`."""

    def __init__(self, module_factory: Callable[[], pl.LightningModule],
                 first: pl.LightningModule | None = None) -> None:
        self.module_factory, self._first = module_factory, first

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_first": None}

    def __call__(self) -> TrainingStepLoss:
        module, self._first = self._first, None
        if module is None:
            module = _check_module(self.module_factory(), TaskError)
        return TrainingStepLoss(module)


class TrainingStepLoss(nn.Module):
    """A LightningModule as the range test's model: ``forward(batch)`` is its ``training_step``
    loss (the module's batch-transfer hooks applied first)."""

    def __init__(self, module: pl.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs  # a dict batch comes as keyword arguments
        m = self.module
        batch = m.on_after_batch_transfer(m.transfer_batch_to_device(
            m.on_before_batch_transfer(batch, 0), m.device, 0), 0)
        with warnings.catch_warnings():
            # self.log() without a Trainer: Lightning warns and logs nothing, as it should here
            warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
            out = m.training_step(batch, 0)
        if out is None:
            raise TaskError("module_factory: training_step returned None in the range test; it "
                            "must return the loss (a tensor, or a dict with 'loss')")
        return out

    def to(self, *args: Any, **kwargs: Any) -> TrainingStepLoss:
        self.module.to(*args, **kwargs)  # LightningModule.to keeps module.device right
        return self


class NoTargets:
    """A dataloader's batches as ``(batch, None)``: the model computes its own loss."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[Any, None]]:
        return ((batch, None) for batch in self.loader)

    def __len__(self) -> int:
        try:
            return len(self.loader)
        except TypeError as exc:
            raise TaskError("datamodule_factory: the train dataloader has no length (an iterable "
                            "dataset?); the range test needs the number of batches per epoch") from exc

    @property
    def generator(self) -> torch.Generator | None:  # reseeded, as a task's train loader is
        return getattr(self.loader, "generator", None)


# ---------------------------------------------------------------------------------------- checks


def _build(module_factory: Any, datamodule_factory: Any,
           error: type[Exception]) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    for name, factory in (("module_factory", module_factory), ("datamodule_factory", datamodule_factory)):
        # a module is callable too: calling it would run its forward
        if not callable(factory) or isinstance(factory, nn.Module | pl.LightningDataModule):
            raise error(f"{name}: got {_type(factory)}; allowed: a zero-argument function returning "
                        f"a fresh {_KINDS[name].__name__} on each call (its class, or a function "
                        "that builds one)")
    module = _check_module(module_factory(), error)
    datamodule = datamodule_factory()
    if not isinstance(datamodule, pl.LightningDataModule):
        raise error(f"datamodule_factory: returned {_type(datamodule)}; allowed: a "
                    f"lightning.LightningDataModule{_hint(datamodule)}")
    return module, datamodule


def _check_module(module: Any, error: type[Exception]) -> pl.LightningModule:
    if not isinstance(module, pl.LightningModule):
        raise error(f"module_factory: returned {_type(module)}; allowed: a lightning.LightningModule"
                    f"{_hint(module)}")
    if not module.automatic_optimization:
        raise error(f"module_factory: {type(module).__name__} sets automatic_optimization = False; "
                    "allowed: automatic optimization (training_step returns the loss; the trial "
                    "steps the optimizer and schedule)")
    return module


_KINDS = {"module_factory": pl.LightningModule, "datamodule_factory": pl.LightningDataModule}


def _type(obj: Any) -> str:
    if obj is None:
        return "None"
    kind = type(obj)
    return f"a {kind.__qualname__}" if kind.__module__ == "builtins" else f"a {kind.__module__}.{kind.__qualname__}"


def _hint(obj: Any) -> str:
    if type(obj).__module__.startswith("pytorch_lightning"):
        return " (this one is pytorch_lightning's: import lightning as L and subclass L's classes)"
    return ""


def _overrides(obj: Any, method: str) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden(method, obj)


