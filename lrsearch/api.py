"""The public Python API: what ``import lrsearch`` offers. The CLI is one call of these per command.

Example (a model that exists only in this session)::

    import lrsearch, torch
    from torch.utils.data import DataLoader, TensorDataset

    def my_task() -> lrsearch.Task:
        x, y = torch.randn(512, 16), torch.randint(0, 4, (512,))
        data = TensorDataset(x, y)
        return lrsearch.Task(
            name="my-mlp",
            build_model=lambda: torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                                    torch.nn.Linear(32, 4)),
            train_loader=DataLoader(data, batch_size=64, shuffle=True),
            val_loader=DataLoader(data, batch_size=256),
            criterion=torch.nn.functional.cross_entropy,
        )

    res = lrsearch.search("examples/synthetic.yaml", task=my_task)
    res.best            # BestConfig(schedule='cosine', max_lr=..., params={...}, ...)
    res.trials[0].state # TrialState.PRUNED
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lrsearch.engine.protocol import Trial
from lrsearch.engine.trial import TaskSource
from lrsearch.errors import ConfigError
from lrsearch.final import FinalResult, run_final
from lrsearch.infra.tracking import find_search_run, heal, read_best_config, resolve_tracking
from lrsearch.infra.tracking.read import latest_final_run, search_results_dir
from lrsearch.job.parse import JobLike, load_job
from lrsearch.output.formats import render
from lrsearch.output.results import BestConfig, SearchResult
from lrsearch.range_test import RangeTestResult
from lrsearch.range_test.finder import find_lr as _find_lr
from lrsearch.range_test.finder import local_dir, save_range_test
from lrsearch.tasks import Task
from lrsearch.tasks.user import python_loop

__all__ = ["Exported", "export", "find_lr", "load_job", "search", "train"]

TaskLike = Task | Callable[[], Task] | None


def search(job: JobLike, *, train_fn: Callable[[Trial], Any] | None = None, task: TaskLike = None,
           metric: str | None = None, mode: str | None = None, num_trials: int | None = None,
           address: str | None = None, resume: bool = False, track: bool = True,
           show_progress: bool = False, verbose: bool = False) -> SearchResult:
    """Run a job's search: range test -> Optuna (TPE or random) + ASHA on Ray Tune -> best config.

    Args:
        job: a :class:`JobConfig`, a job file's path, or a dict with the job file's content.
        train_fn: your own training loop: ``train_fn(trial)`` runs one trial with the
            :class:`~lrsearch.Trial` it gets (its optimizer, schedule, start epoch) and calls
            ``trial.report(epoch, accuracy=...)`` after each epoch. Shipped to the Ray workers by
            value, like ``task``. The job may then leave out ``task``; a ``task`` given (here or in
            the job) is what the range test runs on; without one the range test is off.
        metric, mode: the objective ``train_fn`` reports (default ``accuracy``, ``max``; ``mode``
            defaults to ``min`` for a metric named ``*loss*``).
        task: the task to search, instead of the job's ``task`` section: a :class:`Task` or a
            zero-argument function returning one, defined anywhere (a notebook cell too). It is
            shipped to the Ray workers by value (cloudpickle), so its loaders and model factory
            must pickle that way.
        num_trials: overrides ``search.num_trials``.
        address: join this Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``) instead of
            starting a local one.
        resume: continue an interrupted search: the saved range test, the same MLflow parent run,
            the finished trials; unfinished ones resume from their last checkpoint.
        track: log to MLflow (a parent run, a nested run per trial).
        show_progress: the range test's bar and a live status line on stderr.
        verbose: Ray's own logs and tables.

    Returns:
        The typed :class:`SearchResult` (``.best``, ``.trials``, ``.importances``, ``.paths``).

    Raises:
        ConfigError: a bad job or task. SearchError: results of a search with this name exist
        (and ``resume`` is False), or the Ray cluster cannot be reached. TrackingError: the
        MLflow store cannot be reached. Interrupted: Ctrl+C (the state is kept for ``resume``).
    """
    from lrsearch.tuning.runner import run_search  # Ray, on use

    job = load_job(job)
    if train_fn is None and task is None and job.task is not None and job.task.kind == "python":
        # the entrypoint may return a Task, a Trainer, a Lightning module and its data, or a train_fn

        kind, got = python_loop(job.task, job.base_dir)
        options = {"num_trials": num_trials, "address": address, "resume": resume, "track": track,
                   "show_progress": show_progress, "verbose": verbose}
        loose = job.model_copy(update={"task": None})  # the loop's, not a Task the workers build
        if kind == "trainer":
            from lrsearch.integrations import transformers as hf  # transformers, on use

            return hf.search(loose, got, metric=metric, mode=mode, **options)
        if kind == "lightning":
            from lrsearch.integrations import lightning as pl  # Lightning, on use

            return pl.search(loose, *got, metric=metric, mode=mode, **options)
        if kind == "train_fn":
            return run_search(loose, train_fn=got, metric=metric, mode=mode, **options)

        TaskSource.prime(job.task, job.base_dir, got)  # built once on the driver; the workers build their own
    return run_search(job, task=task, train_fn=train_fn, metric=metric, mode=mode,
                      num_trials=num_trials, address=address,
                      resume=resume, verbose=verbose, show_progress=show_progress, track=track)


def train(job: JobLike, search: SearchResult | BestConfig | Mapping[str, Any] | str | None = None, *, epochs: int | None = None,
          steps: int | None = None, top_k: int = 1, lr_scales: Sequence[float] | str = "auto",
          halving: bool | None = None, range_test: bool = False, register: str | None = None, resume: bool = False,
          task: TaskLike = None, address: str | None = None, track: bool = True,
          tracking_uri: str | None = None, show_progress: bool = False) -> FinalResult:
    """The final run: train the search's best config at your horizon and score it on held-out data.

    Args:
        job: the job (its ``task`` section may ask for more data than the search used, e.g. a
            larger ``task.num_train``; its ``train`` recipe is the one the run trains with).
        search: the search to take the config from: a :class:`SearchResult`, an MLflow run id (the
            search's parent run, or one of its trials), an experiment name (its latest search), or
            ``None``: the job's own latest search (experiment ``tracking.experiment`` or ``name``);
            or a config to train without a search: a ``BestConfig``, an exported ``best_config.yaml``
            loaded as a dict, or ``{"max_lr", "schedule", "params"}`` (the job's optimizer and
            ``train`` recipe train it).
        epochs: epochs to train (whole passes over the train loader); default the search's
            ``max_epochs``. steps: or the run's length in optimizer steps.
        top_k: train the ``top_k`` best completed trials' configs at the horizon and keep the best
            by validation.
        lr_scales: train each of those configs at these multiples of its ``max_lr`` and keep the
            best by validation: a longer run's best LR often sits below the short trials' (e.g.
            ``(1, 0.5, 0.25)``, 3 runs per config). ``"auto"`` (the default): ``(1, 0.5, 0.25)``
            when the run has at least 4x the optimizer steps the config was searched at
            (``best.search_horizon``), ``(1,)`` otherwise; ``(1,)``: the config as found, one run.
        halving: rather than train every config (``top_k`` x ``lr_scales``) for the whole horizon,
            start them all and halve them on the way (successive halving): at a quarter of the
            horizon (and, with 4 or more, at half that before) each is scored by a short cooldown
            branch (its LR cooled to 0 over 20 % of the steps it took, then evaluated: its score
            had its run ended there), and the better half goes on. Three configs cost about 1.7
            runs instead of 3. Needs a horizon of at least 2 epochs. ``None`` (the default): halved
            when ``lr_scales`` is ``"auto"`` and the run has at least 8x the steps the config was
            searched at (the quarter-horizon rung then sees past the search's horizon).
        range_test: train without a search: a range test on the run's own task gives ``max_lr``
            (the geometric mean of its suggestions, within its bounds), trained with the space's
            default schedule at the middle of its ranges. The sweep is a quarter of the run's
            optimizer steps, and at least 12.5 steps a decade of LR (100 over 1e-7..10; the job's
            ``range_test.num_steps`` instead, where it gives a number): a longer sweep points
            lower, and a short one reads high. Costs 1.25 runs from 400 steps, about 2 at 100.
            Give no ``search`` with it.
        register: register the model in MLflow's Model Registry under this name (a new version,
            tagged with the config and the search's run id).
        resume: continue a killed final run from its last epoch checkpoint (the same MLflow run).
        task: an in-memory task, as for :func:`search`.
        address: run on this Ray cluster; the run gets the job's ``resources`` (GPUs too).
        track: log the run and its model to MLflow (nested under the search's parent run).
        tracking_uri: overrides the job's ``tracking.uri``.
        show_progress: each finished epoch on stderr.

    Returns:
        :class:`~lrsearch.final.FinalResult`: ``test_metric`` (on the task's test split, which the
        search never saw), ``val_metric``, ``run_id``, ``model_uri`` (load it with
        ``mlflow.pytorch.load_model``), ``registered``, the config and each candidate's figures.

    Raises:
        ConfigError: a horizon or ``top_k`` below 1, both ``epochs`` and ``steps``, an
        ``lr_scales`` entry not > 0. TrackingError: no
        such run or experiment. SearchError: the search has no completed trial, or every config
        diverged at the horizon. All before anything trains, except the last.
    """

    job = load_job(job)
    return run_final(job, search=search, epochs=epochs, steps=steps, top_k=top_k, lr_scales=lr_scales, halving=halving,
                     range_test=range_test, register=register, resume=resume, task=task, address=address, track=track,
                     tracking_uri=tracking_uri, show_progress=show_progress)


def find_lr(job: JobLike, *, task: TaskLike = None, save: bool = True, plot: str | Path | None = None,
            progress: Callable[[int, int, float, float], None] | None = None) -> RangeTestResult:
    """Run the job's LR range test on a fresh model of its task (or of ``task``).

    With ``save``, the curve's plot (``plot``, default ``STORAGE/NAME/range_test.png``) and
    ``range_test.json`` are written next to the job's results. Returns the result, with
    ``.suggestions()`` and ``.bounds()``.
    """

    job = load_job(job)
    built = TaskSource.of(job.task, job.base_dir, task).get()
    _, result = _find_lr(job, task=built, progress=progress)
    if save:
        save_range_test(local_dir(job.results_dir(), job.name), job.name, built.name, result, plot)
    return result


class Exported(NamedTuple):
    """An exported best config: the text, and a note for the user (or ``None``)."""

    text: str
    note: str | None


def export(best: SearchResult | BestConfig | dict[str, Any] | None = None, *, format: str = "yaml",
           experiment: str | None = None, run_id: str | None = None,
           tracking_uri: str | None = None) -> Exported:
    """The best config in a form a training script uses: ``yaml``, ``json``, ``hf``
    (``transformers.TrainingArguments`` kwargs) or ``torch`` (a scheduler-building snippet).

    Give the config itself (``best``: a search result or its ``.best``), or where MLflow has it:
    an ``experiment`` name (its latest search) or a ``run_id``: a search's (or one of its trials'),
    or a final run's (``lrsearch train``), which exports the config that run trained and kept, at
    the horizon it trained (its ``--lr-scales`` or ``--top-k`` pick included).

    Raises:
        ConfigError: not exactly one source, or an unknown format. TrackingError: no such run.
    """

    sources = sum(x is not None for x in (best, experiment, run_id))
    if sources != 1:
        raise ConfigError("export: give exactly one of best, experiment or run_id "
                          f"(got {sources})")
    if isinstance(best, SearchResult):
        if best.best is None:
            raise ConfigError("export: this search has no best config (no trial completed its budget)")
        best = best.best
    if best is None:
        uri, _ = resolve_tracking(tracking_uri, None, "")
        results = search_results_dir(uri, experiment=experiment, run_id=run_id)
        if results:  # what the store missed of that search while it was down (its best config too)
            heal(results, uri=uri)
        run = find_search_run(uri, experiment=experiment, run_id=run_id, final_itself=True)
        best = read_best_config(uri, run.info.run_id)
    text, note = render(best.to_dict() if isinstance(best, BestConfig) else best, format)
    if experiment is not None:
        note = " ".join(filter(None, [_final_run_note(uri, run, best), note])) or None
    return Exported(text, note)


def _final_run_note(uri: str, search_run: Any, best: dict[str, Any]) -> str | None:
    """When ``lrsearch train`` kept another config than the search's best (an ``--lr-scales`` or
    ``--top-k`` pick at its horizon), where to export that one."""

    final = latest_final_run(uri, search_run)
    if final is None:
        return None
    kept = read_best_config(uri, final.info.run_id)
    if (kept.get("schedule"), kept.get("max_lr")) == (best.get("schedule"), best.get("max_lr")):
        return None
    return (f"this is the search's best; its final run {final.info.run_id} kept {kept['schedule']} "
            f"max_lr={kept['max_lr']:.3g} at {(kept.get('search_horizon') or {}).get('total_steps')} steps, "
            f"the config its model trained with: lrsearch export --run-id {final.info.run_id}.")
