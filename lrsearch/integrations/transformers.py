"""Search a Hugging Face ``Trainer`` as you build it: its model, data, collator and metrics.

::

    from transformers import Trainer, TrainingArguments
    from lrsearch.integrations import transformers as lrs_hf

    def make_trainer() -> Trainer:                     # your code, unchanged
        return Trainer(model=..., args=TrainingArguments("out", eval_strategy="epoch"),
                       train_dataset=train, eval_dataset=val, data_collator=collator,
                       compute_metrics=accuracy)

    result = lrs_hf.search("job.yaml", make_trainer)   # or a job dict
    result.model, result.training_args                 # the best trial's weights, its arguments

Each trial builds your Trainer, gives it the trial's optimizer and schedule (any lrsearch schedule:
STLR, one-cycle, WSD...; ``model_init`` is called first, so it combines with them), trains
``search.max_epochs`` epochs and reports every evaluation to ASHA through a ``TrainerCallback``.
The range test runs first on your Trainer's model and train dataloader (the model's own loss).
Only what the search must control is changed on the Trainer's arguments: the epochs, evaluation
and logging every epoch / step, no saving (lrsearch checkpoints at its rungs), no reporting to
other trackers, and an output directory of the trial's own. Your arguments' recipe (clipping,
precision, accumulation) is what the trials train with.

:func:`from_script` makes the factory of a training script written the way the Hugging Face docs
show, without changing it: it runs the script up to ``trainer.train()`` and takes that Trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import runpy
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lrsearch.engine.protocol import Trial
from lrsearch.engine.trial import _ship_by_value
from lrsearch.errors import ConfigError, SearchError, TaskError
from lrsearch.job.extras import require
from lrsearch.job.parse import load_job
from lrsearch.optim.batches import model_loss
from lrsearch.output.formats import hf_training_arguments
from lrsearch.output.results import SearchResult
from lrsearch.tasks.base import Task
from lrsearch.tuning.runner import run_search

# transformers is an extra: without it, importing this module fails with the pip install that brings it
TrainerCallback = require("transformers", what="lrsearch.integrations.transformers").TrainerCallback
require("accelerate", what="lrsearch.integrations.transformers")  # the Trainer needs it

__all__ = ["TrainerSearchResult", "from_script", "search"]

#: evaluation outputs that are not metrics
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")


@dataclasses.dataclass
class TrainerSearchResult(SearchResult):
    """A :class:`~lrsearch.SearchResult` with the best trial's model (its weights at the end of
    the search's budget) and ``TrainingArguments`` (yours, with the best config's LR, schedule and
    warmup; ``None`` fields where the search found nothing to hand back)."""

    model: torch.nn.Module | None = None
    training_args: Any = None


def search(job: Any, trainer_factory: Callable[[], Any], *, range_test: bool = True,
           metric: str | None = None, mode: str | None = None, **options: Any) -> TrainerSearchResult:
    """Search the learning-rate strategy of the Trainer ``trainer_factory()`` returns.

    Args:
        job: the job (a path, dict or JobConfig); its ``task`` section may be left out.
        trainer_factory: a zero-argument function returning a ready ``transformers.Trainer``
            (``model`` or ``model_init``, ``args``, ``train_dataset``, ``eval_dataset``, a collator
            or tokenizer, ``compute_metrics``). Its datasets may be any torch ``Dataset`` of dicts.
            Defined anywhere (a notebook, a script): it is shipped to the Ray workers by value.
        range_test: run the LR range test on the Trainer's model and train dataloader first.
        metric, mode: the objective, named as ``compute_metrics`` names it (``accuracy``); default
            the arguments' ``metric_for_best_model`` and ``greater_is_better``, else ``accuracy``
            (max) when the Trainer has ``compute_metrics``, else the evaluation ``loss`` (min).
        **options: passed to :func:`lrsearch.search` (``num_trials``, ``track``, ``resume``...).

    Raises:
        ConfigError: the factory does not return a Trainer, or the Trainer has no
            ``train_dataset`` / ``eval_dataset``. All before anything trains.
    """
    trainer = _check(trainer_factory)
    metric, mode = _objective(trainer, metric, mode)
    _ship_by_value(trainer_factory)
    job = load_job(job)
    if not range_test:
        job = job.model_copy(update={"range_test": job.range_test.model_copy(update={"enabled": False})})
    task = functools.partial(range_test_task, trainer_factory) if job.range_test.enabled else None
    del trainer  # the driver's copy: each trial builds its own
    result = run_search(job, train_fn=functools.partial(train_trial, trainer_factory),
                             task=task, metric=metric, mode=mode, **options)
    return _with_best(result, trainer_factory)


def train_trial(trainer_factory: Callable[[], Any], trial: Trial) -> None:
    """One trial: the user's Trainer with the trial's optimizer, schedule, epochs and reports."""
    trainer = trainer_factory()
    if trainer.model_init is not None:  # Trainer(model_init=...) with optimizers: built here, once
        trainer.model = trainer.model_wrapped = trainer.call_model_init()
        trainer.model_init = None
    model = trainer.model.to(trainer.args.device)
    args = trainer.args
    optimizer = trial.optimizer(model)
    loader = trainer.get_train_dataloader()
    per_epoch = max(1, math.ceil(len(loader) / args.gradient_accumulation_steps))
    scheduler = trial.scheduler(optimizer, per_epoch * trial.max_epochs)
    trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
    _control(args, trial.max_epochs - trial.start_epoch)
    callback = _Reporter(trial)
    trainer.add_callback(callback)
    with tempfile.TemporaryDirectory() as out:
        args.output_dir = out
        if trial.start_epoch < trial.max_epochs:
            trainer.train()
    if trial.diverged and not callback.reported_divergence:
        trial.report(callback.epoch(trainer.state.epoch or 0), diverged=True, train_loss=callback.loss)


def _control(args: Any, epochs: int) -> None:
    """What the search controls on the user's ``TrainingArguments`` (read at ``train()`` time)."""
    args.num_train_epochs, args.max_steps = epochs, -1
    args.eval_strategy = "epoch"
    args.save_strategy = "no"
    args.logging_strategy, args.logging_steps, args.logging_first_step = "steps", 1, True
    args.logging_nan_inf_filter = False  # a NaN loss must reach the divergence stop
    args.load_best_model_at_end = False
    args.report_to = []
    args.disable_tqdm = True


class _Reporter(TrainerCallback):
    """Each evaluation to ``trial.report``; each logged training loss to the divergence stop."""

    def __init__(self, trial: Trial) -> None:
        self.trial, self.loss, self.reported_divergence = trial, float("nan"), False

    def epoch(self, state_epoch: float) -> int:
        return self.trial.start_epoch + max(1, round(state_epoch))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            if self.trial.diverging(self.loss):
                control.should_training_stop = True
                control.should_evaluate = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.trial.diverged:
            return
        values = {k.removeprefix("eval_"): float(v) for k, v in (metrics or {}).items()
                  if isinstance(v, int | float) and k.removeprefix("eval_") not in _NOT_METRICS}
        if self.trial.report(self.epoch(state.epoch or 0), train_loss=self.loss, **values):
            control.should_training_stop = True
            self.reported_divergence = self.trial.diverged


def range_test_task(trainer_factory: Callable[[], Any]) -> Task:
    """The range test's task: the Trainer's model (its own loss) on its train dataloader."""
    trainer = trainer_factory()
    loader = _OwnLoss(trainer.get_train_dataloader())
    return Task(name=type(trainer.model or trainer.call_model_init()).__name__,
                build_model=functools.partial(_fresh_model, trainer_factory), train_loader=loader,
                val_loader=loader, criterion=model_loss)


def _fresh_model(trainer_factory: Callable[[], Any]) -> torch.nn.Module:
    trainer = trainer_factory()
    return trainer.call_model_init() if trainer.model_init is not None else trainer.model


class _OwnLoss:
    """A dataloader of dict batches (labels inside) as ``(inputs, None)`` pairs: the model's loss."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self):
        return ((batch, None) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _check(trainer_factory: Any) -> Any:
    from transformers import Trainer

    if not callable(trainer_factory):
        raise ConfigError(f"trainer_factory: got {type(trainer_factory).__name__}; allowed: a "
                          "function returning a transformers.Trainer")
    trainer = trainer_factory()
    if not isinstance(trainer, Trainer):
        raise ConfigError(f"trainer_factory: returned {type(trainer).__name__}; allowed: a "
                          "transformers.Trainer")
    for name in ("train_dataset", "eval_dataset"):
        if getattr(trainer, name) is None:
            raise ConfigError(f"trainer_factory: the Trainer has no {name}; each trial trains on "
                              "train_dataset and is judged on eval_dataset")
    return trainer


def _objective(trainer: Any, metric: str | None, mode: str | None) -> tuple[str, str]:
    args = trainer.args
    if metric is None and args.metric_for_best_model:
        metric = args.metric_for_best_model
        mode = mode or ("max" if args.greater_is_better in (True, None) and "loss" not in metric else "min")
    if metric is None:
        metric = "accuracy" if trainer.compute_metrics is not None else "loss"
    metric = metric.removeprefix("eval_")
    return metric, mode or ("min" if "loss" in metric else "max")


def _with_best(result: SearchResult, trainer_factory: Callable[[], Any]) -> TrainerSearchResult:
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(SearchResult)}
    out = TrainerSearchResult(**fields)
    if result.best is None:
        return out

    trainer = trainer_factory()
    model = trainer.call_model_init() if trainer.model_init is not None else trainer.model
    saved = _best_checkpoint(result)
    if saved is not None:
        state = torch.load(saved, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        out.model = model
    kwargs, _ = hf_training_arguments(result.best)
    known = {f.name for f in dataclasses.fields(type(trainer.args))}
    out.training_args = dataclasses.replace(trainer.args, **{k: v for k, v in kwargs.items() if k in known})
    return out


def _best_checkpoint(result: SearchResult) -> Path | None:
    """The best trial's last checkpoint (``search.keep_checkpoints: best`` keeps it), if local."""
    trial = next((t for t in result.trials if t.trial_id == result.best.trial_id), None)
    if trial is None or "://" in trial.path:
        return None
    found = sorted(Path(trial.path).glob("checkpoint_*/trial.pt"))
    return found[-1] if found else None


class _Captured(BaseException):
    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer


def from_script(path: str | Path, *argv: str) -> Callable[[], Any]:
    """The Trainer factory of a training script, unchanged: each call runs the script (as
    ``python path *argv``) up to its ``trainer.train()`` and returns that Trainer, untrained.

    Raises:
        ConfigError: no such file. SearchError (when called): the script never called
            ``Trainer.train()``.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"from_script: {str(path)!r} is not a file; allowed: a Python training "
                          "script that builds a transformers.Trainer and calls trainer.train()")
    return functools.partial(_run_script, str(path), tuple(argv))


def _run_script(path: str, argv: tuple[str, ...]) -> Any:
    from transformers import Trainer

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    original, saved_argv, saved_path = Trainer.train, sys.argv, list(sys.path)
    Trainer.train = capture
    sys.argv = [path, *argv]
    sys.path.insert(0, str(Path(path).parent))
    try:
        runpy.run_path(path, run_name="__main__")
    except _Captured as caught:
        return caught.trainer
    except SystemExit as exc:
        raise SearchError(f"from_script: {path} exited ({exc.code}) before calling trainer.train()") from None
    finally:
        Trainer.train, sys.argv, sys.path[:] = original, saved_argv, saved_path
    raise TaskError(f"from_script: {path} never called trainer.train(); allowed: a script that builds "
                    "a transformers.Trainer and trains it")
