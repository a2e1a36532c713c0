"""Run one search, start to finish: the orchestration only; each step lives in its own module."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from lrsearch.config import JobConfig, in_ray_job
from lrsearch.errors import Interrupted
from lrsearch.space import SpaceSampler
from lrsearch.tasks import Task
from lrsearch.trial import (
    TaskSource,
    checkpoint_epochs,
    metric_key,
    recipe,
    run_trial,
    steps_per_epoch,
    total_steps,
)
from lrsearch.tuning import results as res
from lrsearch.tuning.checkpoints import fill_replaced_checkpoints, prune_checkpoints
from lrsearch.tuning.interrupt import CtrlC
from lrsearch.tuning.optuna_adapter import importances, study_storage, study_trials
from lrsearch.tuning.progress import LiveProgress
from lrsearch.tuning.setup import first_points, prepare_dir, range_test_data, start_tracker, warn
from lrsearch.tuning.track import log_results, log_setup
from lrsearch.tuning.tuner import TUNE_DIR, build_tuner, check_resources, init_ray


def run_search(job: JobConfig, *, task: Task | Callable[[], Task] | None = None,
               num_trials: int | None = None, address: str | None = None, resume: bool = False,
               verbose: bool = False, show_progress: bool = True, track: bool = True) -> res.SearchResult:
    """Run (or resume) a job's search; see :func:`lrsearch.search` for the arguments."""
    started = time.perf_counter()
    if num_trials is not None:
        job = job.model_copy(update={"search": job.search.model_copy(update={"num_trials": num_trials})})
    root = job.results_dir()
    if in_ray_job() and "://" not in root:
        # Ray may garbage-collect a job's working_dir while Tune still needs a valid working
        # directory (ray-project/ray#52343): run from the results directory instead.
        Path(root).mkdir(parents=True, exist_ok=True)
        os.chdir(root)
    out, resume_tune, notes = prepare_dir(job, root, resume, show_progress)
    started_ray = init_ray(address, verbose)
    try:
        check_resources(job, joined=not started_ray)  # before anything else starts
        tracker = start_tracker(job, root, resume) if track else None
        source = TaskSource.of(job, task)
        built = source.get()
        range_test = range_test_data(job, built, out, resume, show_progress)
        if range_test and range_test.get("warning"):
            notes.append(warn(f"range test: {range_test['warning']}", show_progress))
        space = job.search_space(tuple(range_test["bounds"]) if range_test else None)
        metric, mode = metric_key(built), built.mode
        if tracker is not None and not resume_tune:
            log_setup(tracker, job, built.name, metric, out, range_test, space)
        progress = LiveProgress(metric, mode, job.search.num_trials, show_progress and not verbose)
        if resume_tune:
            fill_replaced_checkpoints(f"{root}/{TUNE_DIR}", checkpoint_epochs(job))
        from ray import tune

        trainable = tune.with_parameters(run_trial, source=source, tracking=tracker.info if tracker else None)
        tuner, searcher = build_tuner(
            job, trainable, sampler=SpaceSampler(space), first_points=first_points(job, space, range_test),
            metric=metric, mode=mode, root=root, study_path=str(out / "optuna.db") if out else None,
            resume=resume_tune, callbacks=[progress], verbose=verbose)
        with CtrlC() as ctrl_c:
            grid = tuner.fit()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if ctrl_c.pressed and progress.running:
        # Tune stopped the running trials (they never completed) and saved its state
        if tracker is not None:
            tracker.interrupted()
        raise Interrupted(f"search {job.name!r} stopped with {len(grid) - len(progress.running)} of "
                          f"{job.search.num_trials} trials finished; its state and checkpoints are kept in {root}")

    result = _collect(job, built, grid, searcher, out, range_test, notes, root)
    if tracker is not None:
        result.tracking = {"uri": tracker.info.uri, "experiment_id": tracker.info.experiment_id,
                           "run_id": tracker.info.parent_run_id}
        result.experiment = job.tracking.experiment or job.name
        result.paths["mlflow_run"] = f"{tracker.info.uri} run {tracker.info.parent_run_id}"
    result.seconds = time.perf_counter() - started
    if out is not None:
        result.paths["summary"] = str(res.write_summary(result, out))
    if tracker is not None:
        log_results(tracker, result, out, total_steps(job, built))
    return result


def _collect(job: JobConfig, task: Task, grid, searcher, out: Path | None, range_test: dict | None,
             notes: list[str], root: str) -> res.SearchResult:
    """Typed results from Ray Tune's grid; checkpoints pruned; the table, best config and study
    written once."""
    per_epoch, s, metric = steps_per_epoch(job, task), job.search, metric_key(task)
    trials = res.trial_records(grid, metric=metric, max_epochs=s.max_epochs, total_steps=total_steps(job, task))
    best = res.best_config(trials, mode=task.mode, metric=metric, optimizer=job.optimizer.model_dump(mode="json"),
                           epochs=s.max_epochs, steps_per_epoch=per_epoch, total_steps=total_steps(job, task),
                           train=recipe(job).to_dict())
    study = searcher.study if searcher is not None else _saved_study(job, out)
    result = res.SearchResult(best=best, trials=trials, metric=metric, mode=task.mode, range_test=range_test,
                              steps_per_epoch=per_epoch, importances=importances(study) if study else {},
                              notes=notes, paths={"results": root, "ray_results": f"{root}/{TUNE_DIR}"})
    prune_checkpoints({t.trial_id: t.path for t in trials}, s.keep_checkpoints, best and best.trial_id)
    if out is not None:
        _write_files(result, out, study)
    return result


def _saved_study(job: JobConfig, out: Path | None):
    """The study of a resumed search, from its Optuna storage next to the results."""
    if out is None or not (out / "optuna.db").is_file():
        return None
    import optuna

    return optuna.load_study(study_name=job.name, storage=study_storage(str(out / "optuna.db")))


def _write_files(result: res.SearchResult, out: Path, study) -> None:
    """The trial table, the best config and the study's own view, once, at the end."""
    result.paths["trials"] = str(res.write_trial_table(result.trials, out))
    if result.best is not None:
        result.paths["best_config"] = str(res.write_best_config(result.best, out))
    if study is not None:
        result.paths["optuna_trials"] = str(res.write_study(study_trials(study), out))
        result.paths["optuna_study"] = f"sqlite:///{out / 'optuna.db'}"
