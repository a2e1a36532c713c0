"""The search: range-test bounds seed Optuna TPE, pruned by ASHA, on Ray Tune.

:func:`run_search` runs a whole job: the LR range test on the driver, the conditional space with
``max_lr`` from its bounds, a Ray Tune ``Tuner`` with a seeded TPE searcher and an ASHA scheduler,
then writes the trial table (Parquet), the best config (YAML) and a summary (JSON) next to Ray's
results under ``STORAGE/NAME/``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from lrsearch.config import JobConfig, in_ray_job
from lrsearch.errors import Interrupted, LRSearchError
from lrsearch.space import SpaceSampler, schedule_params
from lrsearch.storage import filesystem, listing
from lrsearch.tasks import Task, build_task
from lrsearch.tracking import SearchTracker, resolve_tracking
from lrsearch.train import REPLAY_FILE, metric_key, run_trial, steps_per_epoch

__all__ = ["SearchError", "SearchResult", "run_search", "search_dir"]

TUNE_DIR = "tune"


class SearchError(LRSearchError):
    """Raised when a search cannot start or resume (existing results, nothing to resume, no Ray)."""


def search_dir(job: JobConfig) -> str:
    """``STORAGE/NAME``: a local absolute path, or a URI such as ``s3://bucket/runs/NAME``."""
    return job.results_dir()


def _is_local(path: str) -> bool:
    return "://" not in path


@dataclass
class SearchResult:
    """What a finished search produced."""

    best_config: dict[str, Any] | None
    best_metric: float | None
    metric: str
    mode: str
    counts: dict[str, int]
    paths: dict[str, str]
    trials: list[dict[str, Any]] = field(default_factory=list)
    range_test: dict[str, Any] | None = None
    seconds: float = 0.0
    tracking: dict[str, str] | None = None
    experiment: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "best_config": self.best_config,
            "best_metric": self.best_metric,
            "metric": self.metric,
            "mode": self.mode,
            "counts": self.counts,
            "paths": self.paths,
            "bounds": self.range_test["bounds"] if self.range_test else None,
            "tracking": self.tracking,
            "seconds": round(self.seconds, 1),
        }


# --------------------------------------------------------------------------------------------
# Optuna coupling
# --------------------------------------------------------------------------------------------


class PrunedAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna the truth about trials that did not finish.

    Ray's ``OptunaSearch`` reports a trial ASHA stopped early as COMPLETE with its partial value,
    so TPE would learn from truncated runs as if they had finished. Here a trial that ended before
    ``max_t`` iterations, or diverged, is told as PRUNED (its per-iteration values were already
    reported); it carries the user attributes ``diverged`` and ``stopped_at``.
    """

    def __init__(self, *args: Any, max_t: int, trials_file: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = max_t
        self._trials_file = trials_file

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or not result or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)
            self._write_trials()
            return None
        diverged = bool(result.get("diverged"))
        if diverged or result.get(TRAINING_ITERATION, 0) < self._max_t:
            ot_trial = self._ot_trials[trial_id]
            step = int(result.get(TRAINING_ITERATION, 0))
            value = result.get(self.metric)
            if value is not None and step not in self._ot_study.trials[ot_trial.number].intermediate_values:
                # Tune hands the result ASHA stopped on to on_trial_complete only, never to
                # on_trial_result: report it, so TPE ranks the pruned trial by how far it got.
                ot_trial.report(float(value), step)
            ot_trial.set_user_attr("diverged", diverged)
            ot_trial.set_user_attr("stopped_at", int(result.get(TRAINING_ITERATION, 0)))
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
        else:
            super().on_trial_complete(trial_id, result, error)
        self._write_trials()
        return None

    def _write_trials(self) -> None:
        # The study lives in this (driver-side) object; keep a readable copy next to the results.
        if self._trials_file:
            tmp = self._trials_file + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(self.study_trials(), fh, indent=1, default=str)
            os.replace(tmp, self._trials_file)

    def study_trials(self) -> list[dict[str, Any]]:
        """Every Optuna trial's number, state, value, params and user attributes."""
        return [
            {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
             "user_attrs": t.user_attrs}
            for t in self._ot_study.trials
        ]


# --------------------------------------------------------------------------------------------
# Progress on the terminal
# --------------------------------------------------------------------------------------------


class LiveProgress(Callback):
    """One live status line: trials running/done and the best so far (instead of Ray's tables)."""

    def __init__(self, metric: str, mode: str, num_trials: int, enabled: bool) -> None:
        self.metric, self.mode, self.num_trials, self.enabled = metric, mode, num_trials, enabled
        self.running: set[str] = set()
        self.done = 0
        self.best: float | None = None
        self._status = None

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles callbacks with the experiment state; the live terminal widget stays here.
        return {**self.__dict__, "_status": None}

    def _show(self) -> None:
        if not self.enabled:
            return
        if self._status is None:
            from lrsearch.console import err

            self._status = err.status("")
            self._status.start()
        best = "-" if self.best is None else f"{self.best:.4f}"
        self._status.update(f"trials: {len(self.running)} running, {self.done}/{self.num_trials} done; "
                            f"best epoch so far: {self.metric} {best}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is not None and not result.get("diverged") and math.isfinite(value):
            better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
            self.best = value if better else self.best
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done += 1
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)

    def on_experiment_end(self, trials, **info):
        if self._status is not None:
            self._status.stop()
            self._status = None


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class _CtrlC:
    """Tells whether Ctrl+C stopped ``tuner.fit()`` (a time budget stops running trials too).

    Tune installs its own SIGINT handler for the run; the first Ctrl+C makes it stop the trials,
    save its state and put back the handler it found, this one (a second Ctrl+C then interrupts).
    """

    def __enter__(self) -> _CtrlC:
        self.pressed = False
        self._main = threading.current_thread() is threading.main_thread()
        if self._main:
            self._before = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._again)
        return self

    def _again(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self._main:
            self.pressed = signal.getsignal(signal.SIGINT) == self._again
            signal.signal(signal.SIGINT, self._before)


def _init_ray(address: str | None, verbose: bool) -> bool:
    """Connect to (or start) Ray. Returns True if this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not verbose:
        # Fast trials checkpoint often; Tune's "snapshotting may become a bottleneck" is noise here.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    if address or os.environ.get("RAY_ADDRESS"):
        # --address, or RAY_ADDRESS (set by Ray for a submitted job's entrypoint): join that cluster
        target = address or os.environ["RAY_ADDRESS"]
        try:
            ray.init(address=target, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SearchError(f"--address {target!r}: cannot connect to a Ray cluster: {first}") from None
    else:
        # "local": a fresh Ray for this search, never whatever cluster `ray start` last left recorded
        # on this machine (ray.init()'s default would join that one)
        ray.init(address="local", include_dashboard=False, **kwargs)
    return True


def _range_test(job: JobConfig, task: Task, out: Path | None, resume: bool, verbose: bool) -> dict | None:
    if not job.range_test.enabled:
        return None
    saved = out / "range_test.json" if out else None
    if resume and saved is not None and saved.is_file():
        return json.loads(saved.read_text())
    from lrsearch.console import RangeTestProgress
    from lrsearch.find_lr import find_lr, save_range_test

    with RangeTestProgress(job.range_test.num_steps, enabled=verbose) as bar:
        _, result = find_lr(job, task=task, progress=bar.callback)
    return save_range_test(job, task.name, result)["range_test"]


def run_search(
    job: JobConfig,
    *,
    num_trials: int | None = None,
    address: str | None = None,
    resume: bool = False,
    verbose: bool = False,
    show_progress: bool = True,
    track: bool = True,
) -> SearchResult:
    """Run (or resume) the job's search and write its results.

    Args:
        job: the validated job.
        num_trials: overrides ``search.num_trials``.
        address: join this Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``) instead of
            starting a local one.
        resume: continue an interrupted search from its storage directory: finished trials are
            kept, unfinished ones resume from their last checkpoint, the searcher's state is restored.
        verbose: show Ray's own logs and progress tables.
        show_progress: show the range test's bar and a live status line.
        track: log the search to MLflow (parent run + one nested run per trial).

    Raises:
        SearchError: results already exist (and ``resume`` is False), or there is nothing to resume.
    """
    import optuna
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    if num_trials is not None:
        job = job.model_copy(update={"search": job.search.model_copy(update={"num_trials": num_trials})})
    root = search_dir(job)
    if in_ray_job() and _is_local(root):
        # Ray may garbage-collect a job's working_dir while Tune still needs a valid working
        # directory (ray-project/ray#52343): run from the results directory instead.
        Path(root).mkdir(parents=True, exist_ok=True)
        os.chdir(root)
    tune_path = f"{root}/{TUNE_DIR}"
    local_out = Path(root) if _is_local(root) else None
    exists = tune.Tuner.can_restore(tune_path) if (local_out is None or Path(tune_path).exists()) else False
    if exists and not resume:
        raise SearchError(
            f"a search named {job.name!r} already has results in {root}; "
            f"continue it with --resume, or change 'name' / delete that directory"
        )
    if resume and not exists:
        raise SearchError(f"--resume: no interrupted search named {job.name!r} in {root}")

    tracker = None
    if track:
        uri, experiment = resolve_tracking(job.tracking.uri, job.tracking.experiment, job.name)
        # an unreachable store fails here, before any training starts
        tracker = SearchTracker.start(uri=uri, experiment=experiment, job_name=job.name,
                                      results_dir=root, resume=resume)
    task = build_task(job)
    if local_out is not None:
        local_out.mkdir(parents=True, exist_ok=True)
    range_test = _range_test(job, task, local_out, resume, verbose=show_progress)
    bounds = tuple(range_test["bounds"]) if range_test else None
    space = job.search_space(bounds)  # type: ignore[arg-type]
    if tracker is not None and not resume:
        _log_setup(tracker, job, task, local_out, range_test, space)
    sampler = SpaceSampler(space)
    metric, mode = metric_key(task), task.mode
    first = None
    if range_test:
        # Seed the search with the range test's consensus suggestion, clipped into the bounds.
        s = [v for v in range_test["suggestions"].values() if v]
        guess = math.exp(sum(math.log(v) for v in s) / len(s)) / 3 if s else math.sqrt(bounds[0] * bounds[1])
        lo, hi = space.max_lr_prior.low, space.max_lr_prior.high
        first = sampler.first_point(min(max(guess, lo), hi))

    started_ray = _init_ray(address, verbose)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, job=job, tracking=tracker.info if tracker else None),
            {"cpu": job.resources.cpu, "gpu": job.resources.gpu},
        )
        progress = LiveProgress(metric, mode, job.search.num_trials, show_progress and not verbose)
        run_config = tune.RunConfig(
            name=TUNE_DIR,
            storage_path=root,
            failure_config=tune.FailureConfig(max_failures=job.search.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=2 if verbose else 0,
            callbacks=[progress],
        )
        if resume:
            _fill_replaced_checkpoints(tune_path)
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
            # callbacks are not part of the saved state: show progress again
            tuner._local_tuner._run_config.callbacks = [progress]  # noqa: SLF001
        else:
            searcher = PrunedAwareOptunaSearch(
                space=sampler,
                metric=metric,
                mode=mode,
                points_to_evaluate=[first] if first else None,
                sampler=TPESampler(seed=job.search.seed, n_startup_trials=min(5, job.search.num_trials)),
                max_t=job.search.max_epochs,
                trials_file=str(local_out / "optuna_trials.json") if local_out else None,
            )
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=job.search.max_epochs,
                grace_period=job.search.grace_period,
                reduction_factor=job.search.reduction_factor,
            )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=job.search.num_trials,
                    max_concurrent_trials=job.search.max_concurrent_trials,
                    time_budget_s=job.search.time_budget_s,
                    # a reused worker keeps the built task (pretrained weights, tokenised data)
                    reuse_actors=True,
                ),
                run_config=run_config,
            )
        with _CtrlC() as ctrl_c:
            grid = tuner.fit()
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    if ctrl_c.pressed and progress.running:
        # Tune stopped the running trials (they never completed) and saved its state
        if tracker is not None:
            tracker.interrupted()
        raise Interrupted(
            f"search {job.name!r} stopped with {len(grid) - len(progress.running)} of "
            f"{job.search.num_trials} trials finished; "
            f"its state and checkpoints are kept in {root}"
        )
    trials = _trial_table(grid, job, task, metric)
    result = _write_results(job, root, local_out, trials, metric, mode, range_test, task)
    _prune_checkpoints(trials, job.search.keep_checkpoints,
                       result.best_config["trial_id"] if result.best_config else None)
    if tracker is not None:
        _log_results(tracker, result, job, task, local_out)
        result.paths["mlflow_run"] = f"{tracker.info.uri} run {tracker.info.parent_run_id}"
        result.tracking = {"uri": tracker.info.uri, "experiment_id": tracker.info.experiment_id,
                           "run_id": tracker.info.parent_run_id}
        result.experiment = job.tracking.experiment or job.name
        if local_out is not None:
            (local_out / "summary.json").write_text(json.dumps(result.summary(), indent=1, default=str))
    result.seconds = time.perf_counter() - started
    return result


def _log_setup(tracker: SearchTracker, job: JobConfig, task: Task, out: Path | None,
               range_test: dict | None, space: Any) -> None:
    """Job file, resolved space and range test on the parent run."""
    params: dict[str, Any] = {"task": task.name, "task.kind": job.task.kind, "metric": metric_key(task),
                              "optimizer": job.optimizer.name.value, "num_trials": job.search.num_trials,
                              "max_epochs": job.search.max_epochs, "grace_period": job.search.grace_period,
                              "reduction_factor": job.search.reduction_factor, "space.family": space.family,
                              "space.schedules": ",".join(space.schedules),
                              "space.max_lr_low": space.max_lr_prior.low,
                              "space.max_lr_high": space.max_lr_prior.high}
    metrics: dict[str, float] = {}
    if range_test:
        for method, lr in range_test["suggestions"].items():
            if lr is not None:
                params[f"range_test.{method}"] = lr
                metrics[f"range_test.{method}"] = lr
        low, high = range_test["bounds"]
        params.update({"range_test.bounds_low": low, "range_test.bounds_high": high,
                       "range_test.stop_reason": range_test["stop_reason"]})
        metrics.update({"range_test.bounds_low": low, "range_test.bounds_high": high})
    tracker.log_params(params)
    if metrics:
        tracker.log_metrics(metrics)
    if out is None:
        return
    job_file = out / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
    space_file = out / "space.yaml"
    space_file.write_text(yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False))
    tracker.log_artifact(job_file)
    tracker.log_artifact(space_file)
    for name in ("range_test.png", "range_test.json"):
        if (out / name).is_file():
            tracker.log_artifact(out / name, "range_test")


def _log_results(tracker: SearchTracker, result: SearchResult, job: JobConfig, task: Task,
                 out: Path | None) -> None:
    """Trial table, plots and best config on the parent run; final state on every child run."""
    from lrsearch.report import plot_lr_curves, plot_search

    c = result.counts
    tracker.log_metrics({f"trials_{k}": float(v) for k, v in c.items()})
    if result.best_metric is not None:
        tracker.log_metrics({f"best_{result.metric}": result.best_metric})
        tracker.log_params({f"best.{k}": v for k, v in (
            ("schedule", result.best_config["schedule"]), ("max_lr", result.best_config["max_lr"]),
            ("trial_id", result.best_config["trial_id"]))})
    if out is not None:
        plot_search(result.trials, str(out / "search.png"), result.metric)
        ranked = sorted((t for t in result.trials if t["state"] == "completed"),
                        key=lambda t: t["final_metric"], reverse=result.mode == "max")
        plot_lr_curves(ranked, str(out / "lr_curves_top.png"),
                       steps_per_epoch(job, task) * job.search.max_epochs)
        for name in ("trials.parquet", "search.png", "lr_curves_top.png", "best_config.yaml",
                     "summary.json", "optuna_trials.json"):
            if (out / name).is_file():
                tracker.log_artifact(out / name)
    tracker.finish_trials(result.trials)
    pending = tracker.finish(ok=c["errored"] < c["total"])
    result.paths["mlflow_pending"] = str(pending)


def _checkpoint_dirs(fs: Any, trial_dir: str) -> dict[int, str]:
    """``{N: path}`` of a trial's ``checkpoint_NNNNNN`` directories."""
    numbered = ((re.fullmatch(r"checkpoint_(\d+)", name), path)
                for name, path in listing(fs, trial_dir, dirs=True).items())
    return {int(match[1]): path for match, path in numbered if match}


def _fill_replaced_checkpoints(tune_path: str) -> None:
    """Make every checkpoint an interrupted search's saved state can name restorable.

    Tune saves the search's state (which checkpoint each trial resumes from) every 10 s or so,
    but deletes a trial's previous checkpoint as soon as the next one is registered
    (``num_to_keep=1``). A driver killed in between leaves a state naming a checkpoint that is
    gone, and the trial would fail to restore (ray-project/ray#27790). A trial's checkpoint
    ``N`` holds epoch ``N + 1`` (one per epoch), so each missing one below the newest becomes a
    ``replay.json`` that tells :func:`~lrsearch.train.run_trial` to retrain those epochs.
    """
    fs, base = filesystem(tune_path)
    for trial_dir in listing(fs, base, dirs=True).values():
        found = _checkpoint_dirs(fs, trial_dir)
        for index in range(max(found, default=-1)):
            if index not in found:
                missing = f"{trial_dir}/checkpoint_{index:06d}"
                fs.create_dir(missing)
                with fs.open_output_stream(f"{missing}/{REPLAY_FILE}") as f:
                    f.write(json.dumps({"epoch": index + 1}).encode())


def _prune_checkpoints(trials: list[dict[str, Any]], keep: str, best_id: str | None) -> None:
    """Free the disk the finished search no longer needs (a fine-tuned model per trial adds up)."""
    if keep == "all":
        return
    for t in trials:
        fs, trial_dir = filesystem(t["path"])
        found = _checkpoint_dirs(fs, trial_dir)
        if keep == "best" and t["trial_id"] == best_id and found:
            del found[max(found)]  # its final state stays
        for path in found.values():
            fs.delete_dir(path)


def _state(result: Any, max_t: int) -> tuple[str, int]:
    metrics = result.metrics or {}
    epochs = int(metrics.get("training_iteration", 0) or 0)
    if result.error is not None:
        return "errored", epochs
    if metrics.get("diverged"):
        return "diverged", epochs
    if epochs < max_t:
        return "pruned", epochs
    return "completed", epochs


def _error_line(error: BaseException) -> str:
    """The exception's own message: Ray's wrapper puts the remote traceback (with colours) first."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:500] if lines else type(error).__name__


def _trial_table(grid: Any, job: JobConfig, task: Task, metric: str) -> list[dict[str, Any]]:
    max_t = job.search.max_epochs
    total = steps_per_epoch(job, task) * max_t
    rows = []
    for result in grid:
        config = dict(result.config or {})
        state, epochs = _state(result, max_t)
        df = result.metrics_dataframe
        if df is not None and TRAINING_ITERATION in df:
            # a resumed trial may report again the epochs after Tune's last saved state
            df = df.drop_duplicates(TRAINING_ITERATION, keep="last")
        per_epoch = [] if df is None or metric not in df else [float(v) for v in df[metric].tolist()]
        losses = [] if df is None or "train_loss" not in df else [float(v) for v in df["train_loss"].tolist()]
        try:
            params = schedule_params(config, total) if "schedule" in config else {}
        except ValueError:
            params = {}
        metrics = result.metrics or {}
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "schedule": config.get("schedule"),
            "max_lr": config.get("max_lr"),
            "weight_decay": config.get("weight_decay"),
            "layer_decay": config.get("layer_decay"),
            "config": json.dumps(config, sort_keys=True, default=str),
            "schedule_params": json.dumps(params, sort_keys=True),
            "state": state,
            "stopped_at_epoch": epochs,
            "final_metric": per_epoch[-1] if per_epoch else None,
            "best_metric": (max(per_epoch) if task.mode == "max" else min(per_epoch)) if per_epoch else None,
            "metric_per_epoch": per_epoch,
            "train_loss_per_epoch": losses,
            "wall_seconds": float(metrics.get("time_total_s") or 0.0),
            "train_seconds": float(df["train_seconds"].sum()) if df is not None and "train_seconds" in df else 0.0,
            "node_id": metrics.get("node_id"),
            "error": None if result.error is None else _error_line(result.error),
            "path": result.path,
        })
    return rows


def _write_results(job, root, local_out, trials, metric, mode, range_test, task) -> SearchResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = {k: sum(1 for t in trials if t["state"] == k)
              for k in ("completed", "pruned", "diverged", "errored")}
    counts["total"] = len(trials)
    finished = [t for t in trials if t["state"] == "completed" and t["final_metric"] is not None]
    best = None
    if finished:
        best = (max if mode == "max" else min)(finished, key=lambda t: t["final_metric"])
    best_config = None
    if best is not None:
        config = json.loads(best["config"])
        best_config = {
            "schedule": best["schedule"],
            "max_lr": best["max_lr"],
            "schedule_params": json.loads(best["schedule_params"]),
            "optimizer": job.optimizer.model_dump(mode="json")
            | ({"weight_decay": config["weight_decay"]} if "weight_decay" in config else {}),
            "layer_decay": config.get("layer_decay"),
            "total_steps": steps_per_epoch(job, task) * job.search.max_epochs,
            "epochs": job.search.max_epochs,
            "metric": metric,
            "value": best["final_metric"],
            "trial_id": best["trial_id"],
            "search_config": config,
        }
    paths = {"results": root, "ray_results": f"{root}/{TUNE_DIR}"}
    if local_out is not None:
        table = pa.Table.from_pylist(trials)
        pq.write_table(table, local_out / "trials.parquet")
        paths["trials"] = str(local_out / "trials.parquet")
        if best_config is not None:
            (local_out / "best_config.yaml").write_text(yaml.safe_dump(best_config, sort_keys=False))
            paths["best_config"] = str(local_out / "best_config.yaml")
        if (local_out / "optuna_trials.json").is_file():
            paths["optuna_trials"] = str(local_out / "optuna_trials.json")
    result = SearchResult(
        best_config=best_config,
        best_metric=None if best is None else best["final_metric"],
        metric=metric,
        mode=mode,
        counts=counts,
        paths=paths,
        trials=trials,
        range_test=range_test,
    )
    if local_out is not None:
        (local_out / "summary.json").write_text(json.dumps(result.summary(), indent=1, default=str))
        paths["summary"] = str(local_out / "summary.json")
    return result
