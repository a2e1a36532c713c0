"""Run one search, start to finish: the orchestration only; each step lives in its own module."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from lrsearch.engine import Horizon
from lrsearch.engine.protocol import Trial, TrialPlan, checkpoint_epochs, worst_metric
from lrsearch.engine.trial import (
    TaskSource,
    metric_key,
    run_trial,
    trial_horizon,
    user_loop,
)
from lrsearch.errors import ConfigError, Interrupted
from lrsearch.infra.ray_runtime import check_resources, init_ray
from lrsearch.infra.storage import filesystem, listing
from lrsearch.infra.tracking import heal, resolve_tracking
from lrsearch.job.config import JobConfig, SearchConfig, in_ray_job
from lrsearch.job.extras import check_job
from lrsearch.job.space import SpaceSampler
from lrsearch.optim.recipe import Recipe
from lrsearch.output import results as res
from lrsearch.output.report import dropped_text
from lrsearch.range_test.finder import find_lr
from lrsearch.tasks import Task
from lrsearch.tuning import warm_start as ws
from lrsearch.tuning.budget import Ledger
from lrsearch.tuning.checkpoints import fill_replaced_checkpoints, prune_checkpoints
from lrsearch.tuning.interrupt import CtrlC
from lrsearch.tuning.optuna_adapter import (
    importances,
    study_storage,
    study_trials,
    tune_record,
    unknown_to_tune,
)
from lrsearch.tuning.progress import LiveProgress
from lrsearch.tuning.setup import first_points, prepare_dir, range_test_data, start_tracker, warn
from lrsearch.tuning.track import log_results, log_setup, log_warm_start
from lrsearch.tuning.tuner import TUNE_DIR, build_tuner


def run_search(job: JobConfig, *, task: Task | Callable[[], Task] | None = None,
               train_fn: Callable[[Trial], Any] | None = None, metric: str | None = None,
               mode: str | None = None, num_trials: int | None = None, address: str | None = None,
               resume: bool = False, verbose: bool = False, show_progress: bool = True,
               track: bool = True) -> res.SearchResult:
    """Run (or resume) a job's search; see :func:`lrsearch.search` for the arguments."""
    started = time.perf_counter()
    loop = user_loop(train_fn, metric, mode)
    if loop is None and task is None and job.task is None:
        raise ConfigError("task: missing; a job needs a task section, unless the search gets its "
                          "own training loop (train_fn=, or an integration) or task=")
    check_job(job.task, job.tracking.uri, own_task=task is not None, track=track)  # a missing extra: one line, before anything
    if track:  # what MLflow missed of this job's last search and final run, first
        heal(job.results_dir(), uri=resolve_tracking(job.tracking.uri, None, job.name)[0])
    if num_trials is not None:
        job = job.model_copy(update={"search": job.search.model_copy(update={"num_trials": num_trials})})
    root = job.results_dir()
    if in_ray_job() and "://" not in root:
        # Ray may garbage-collect a job's working_dir while Tune still needs a valid working
        # directory (ray-project/ray#52343): run from the results directory instead.
        Path(root).mkdir(parents=True, exist_ok=True)
        os.chdir(root)
    out, resume_tune, notes = prepare_dir(job.name, root, resume, show_progress)
    # the earlier searches are read before anything starts: a bad search.warm_start fails here
    past = ws.read_past_searches(job.search.warm_start, resolve_tracking(job.tracking.uri, None, job.name)[0]) \
        if job.search.warm_start and not resume_tune else []
    started_ray = init_ray(address, verbose)
    try:
        check_resources(job.resources, joined=not started_ray)  # before anything else starts
        tracker = start_tracker(job.tracking, job.name, root, resume) if track else None
        source = TaskSource.of(job.task, job.base_dir, task)
        # with the user's loop, the task (if any) is the range test's only
        built = source.get() if loop is None or task is not None or job.task is not None else None
        if built is None and job.range_test.enabled:
            notes.append(warn("range test: off, since the search has no task to run it on (give "
                              "task=, or a range-test task with the integration); max_lr comes from "
                              "the space's prior", show_progress))
        measure = partial(find_lr, job, task=built) if built is not None and job.range_test.enabled else None
        range_test = range_test_data(measure, out, resume, show_progress, root, job.name)
        if range_test and range_test.get("warning"):
            notes.append(warn(f"range test: {range_test['warning']}", show_progress))
        space = job.search_space(tuple(range_test["bounds"]) if range_test else None)
        metric, mode = (loop.metric, loop.mode) if loop is not None else (metric_key(built), built.mode)
        worst = worst_metric(metric, mode)
        warm_trials, warm_report = [], ws.saved_report(out) if resume_tune else None
        if past:
            warm_trials, warm_report = ws.seed_trials(past, space, metric=metric, max_epochs=job.search.max_epochs,
                                                      worst=worst)
            if out is not None:
                ws.write_report(warm_report, out)
            if not warm_trials:
                notes.append(warn("search.warm_start: no trial of the earlier searches fits this one "
                                  f"(dropped: {dropped_text(warm_report)})", show_progress))
        if tracker is not None and not resume_tune:
            log_setup(tracker, job.model_dump(mode="json"), built.name if built else loop.name, metric, out,
                      range_test, space)
            if warm_report:
                log_warm_start(tracker, warm_report, out)
        ledger = Ledger.for_search(job.search, gpu=job.resources.gpu, metric=metric, mode=mode)
        progress = LiveProgress(ledger, show_progress and not verbose, tracker=tracker, print_line=in_ray_job())
        if resume_tune:
            fill_replaced_checkpoints(f"{root}/{TUNE_DIR}", checkpoint_epochs(job.search))
        from ray import tune

        plan = TrialPlan.of(job.train, job.optimizer, job.search)
        trainable = tune.with_parameters(run_trial, source=source, plan=plan,
                                         tracking=tracker.info if tracker else None, loop=loop)
        points = first_points(job.search.start_points, space, range_test)
        tuner, searcher = build_tuner(
            job.search, job.resources, job.name, trainable, sampler=SpaceSampler(space), first_points=points,
            metric=metric, mode=mode, root=root, study_path=str(out / "optuna.db") if out else None,
            resume=resume_tune, callbacks=[progress], verbose=verbose, ledger=ledger, warm_trials=warm_trials)
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

    horizon = _horizon(job.search, job.train.gradient_accumulation_steps, built if loop is None else None, grid)
    study = searcher.study if searcher is not None else _saved_study(job.name, out)
    result = _collect(job.search, horizon, (metric, mode), grid, study, out, range_test, notes, root,
                      optimizer=job.optimizer.model_dump(mode="json"), recipe=Recipe.of(job.train),
                      resumed=searcher is None)
    result.warm_start = warm_report
    result.progress = ledger.snapshot(finished=True)
    if tracker is not None:
        result.tracking = {"uri": tracker.info.uri, "experiment_id": tracker.info.experiment_id,
                           "run_id": tracker.info.parent_run_id}
        result.experiment = job.tracking.experiment or job.name
        result.paths["mlflow_run"] = f"{tracker.info.uri} run {tracker.info.parent_run_id}"
    result.seconds = time.perf_counter() - started
    if out is not None:
        result.paths["summary"] = str(res.write_summary(result, out))
    if tracker is not None:
        log_results(tracker, result, out, horizon.total_steps)
    return result


def _horizon(s: SearchConfig, accumulate: int, task: Task | None, grid) -> Horizon:
    """The trials' length: the built-in loop's comes from the task (``accumulate``: batches per
    optimizer step); a user's loop says it to its scheduler, and its trials report it (``total_steps``)."""
    if task is not None:
        return trial_horizon(task, accumulate, s.max_steps_per_epoch, s.max_epochs)
    told = [int((r.metrics or {}).get("total_steps") or 0) for r in grid]
    total = max(told, default=0) or s.max_epochs
    return Horizon(max(1, total // s.max_epochs), total)


def _collect(s: SearchConfig, horizon: Horizon, objective: tuple[str, str], grid, study, out: Path | None,
             range_test: dict | None, notes: list[str], root: str, *, optimizer: dict[str, Any], recipe: Recipe,
             resumed: bool) -> res.SearchResult:
    """Typed results from Ray Tune's grid (``study``: the search's Optuna study); checkpoints
    pruned; the table, best config and study written once. ``optimizer`` and ``recipe``: what the
    trials trained with, recorded in the best config."""
    per_epoch, (metric, mode), total = horizon.steps_per_epoch, objective, horizon.total_steps
    results = list(grid)
    if resumed and study is not None:  # resumed: Tune's restored state may lack some trials
        results += _unknown_to_tune(study, results, f"{root}/{TUNE_DIR}")
    trials = res.trial_records(results, metric=metric, max_epochs=s.max_epochs, total_steps=total)
    best = res.best_config(trials, mode=mode, metric=metric, optimizer=optimizer,
                           epochs=s.max_epochs, steps_per_epoch=per_epoch, total_steps=total,
                           train=recipe.to_dict())
    result = res.SearchResult(best=best, trials=trials, metric=metric, mode=mode, range_test=range_test,
                              steps_per_epoch=per_epoch, importances=importances(study) if study else {},
                              notes=notes, paths={"results": root, "ray_results": f"{root}/{TUNE_DIR}"})
    prune_checkpoints({t.trial_id: t.path for t in trials}, s.keep_checkpoints, best and best.trial_id)
    if out is not None:
        _write_files(result, out, study)
    return result


def _unknown_to_tune(study, results: list, tune_path: str) -> list:
    """The results of the trials that finished after Tune's last saved state and before the driver
    died (the study has them; the restored Tune did not), rebuilt from the record the study keeps
    of each (Tune's own files in their directories may lag, or be missing)."""
    from ray.tune import Result

    missing = unknown_to_tune(study, {res.trial_id_of(r) for r in results})
    if not missing:
        return []
    names = list(listing(*filesystem(tune_path), dirs=True))
    trials = study.get_trials(deepcopy=False)
    found = []
    for tid, number in missing.items():
        path = f"{tune_path}/{next((n for n in names if f'_{tid}_' in n), tid)}"
        # the study's record first: Tune's files in the trial directory may lag or be missing
        rebuilt = tune_record(trials[number], path)
        if rebuilt is None:  # a study written before trials kept a record
            try:
                rebuilt = Result.from_path(path)
            except RuntimeError:  # no result.json, no progress.csv: the driver never wrote them
                continue
        found.append(rebuilt)
    return found


def _saved_study(name: str, out: Path | None):
    """The study of the resumed search ``name``, from its Optuna storage next to the results."""
    if out is None or not (out / "optuna.db").is_file():
        return None
    import optuna

    return optuna.load_study(study_name=name, storage=study_storage(str(out / "optuna.db")))


def _write_files(result: res.SearchResult, out: Path, study) -> None:
    """The trial table, the best config and the study's own view, once, at the end."""
    result.paths["trials"] = str(res.write_trial_table(result.trials, out))
    if result.best is not None:
        result.paths["best_config"] = str(res.write_best_config(result.best, out))
    if study is not None:
        result.paths["optuna_trials"] = str(res.write_study(study_trials(study), out))
        result.paths["optuna_study"] = f"sqlite:///{out / 'optuna.db'}"
