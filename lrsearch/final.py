"""The final run (``lrsearch train``): the search's best config trained at the user's horizon.

The driver reads the search back (a :class:`SearchResult`, or MLflow: a run id, an experiment's
latest search, by default the job's own), checks the horizon, opens the MLflow run (nested under the
search's parent) and hands the training to one Ray task with the job's ``resources`` (the GPU Ray
grants, CUDA when it does). That task trains each of the top-k configs for the whole horizon, the
trials' way: the same model factory, optimizer, schedule resolved for the horizon's optimizer steps
through :func:`lrsearch.space.schedule_params` (the conversion the export gives users), the same
recipe (clipping, precision, accumulation) and divergence stop. It keeps the best by validation,
scores that one, once, on the task's held-out test split (which the search never saw), and logs
the model (MLflow's pytorch flavour; a registry version with ``register``).

Every epoch leaves a checkpoint under ``STORAGE/NAME/final/``, so ``resume`` continues a run that
was killed where it stopped: the same MLflow run, the epochs done kept.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lrsearch.config import JobConfig
from lrsearch.divergence import DivergenceMonitor
from lrsearch.errors import ConfigError, SearchError
from lrsearch.extras import check_job
from lrsearch.optim import eval_mode
from lrsearch.recipe import Stepper
from lrsearch.space import schedule_params
from lrsearch.tasks import Task, evaluate, reseed
from lrsearch.tracking.store import redact_uri
from lrsearch.trial import (
    TaskSource,
    build_trial,
    load_state,
    loader_steps,
    metric_key,
    recipe,
    train_epoch,
    trainable_state,
    trial_device,
)
from lrsearch.tuning.results import (
    BestConfig,
    SearchResult,
    TrialState,
    ranked_completed,
    trained_optimizer,
    write_best_config,
)

__all__ = ["FinalResult", "run_final"]

FINAL_DIR = "final"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Candidate:
    """One config to train: a completed trial of the search (``trial_id``), at a multiple of its
    ``max_lr`` when ``--lr-scales`` asks (``trial_id@0.5x``)."""

    trial_id: str
    config: dict[str, Any]
    search_value: float | None


@dataclass
class FinalResult:
    """What a final run produced.

    Attributes:
        test_metric: the chosen model's metric on the held-out test split (``None`` when the task
            has none); ``test_loss`` its mean loss.
        val_metric: its metric on the validation split after the last epoch.
        metric: the metric's name (``accuracy``), ``mode`` its direction.
        run_id, model_uri: the MLflow run and the logged model (``runs:/`` or ``models:/`` URI).
        registered: ``{"name", "version", "uri"}`` of the Model Registry version, or ``None``.
        trial_id, config: the search trial whose config was trained, and that config.
        candidates: each config trained (top-k), with its search value and final validation metric.
        epochs, total_steps, steps_per_epoch: the horizon trained.
        search_run_id: the search's MLflow parent run.
        lr_scales: the multiples of each config's ``max_lr`` trained (``auto`` resolved).
        resumed_from_epoch: the epoch a resumed run continued from (0: a fresh run).
        tracking_uri: the MLflow store the run and model are in.
        best_config: the config trained, as a best config chosen at this run's horizon (what
            ``lrsearch export --run-id RUN_ID`` exports; also ``paths["best_config"]``).
    """

    test_metric: float | None
    test_loss: float | None
    val_metric: float
    metric: str
    mode: str
    run_id: str | None
    model_uri: str | None
    registered: dict[str, str] | None
    trial_id: str
    config: dict[str, Any]
    candidates: list[dict[str, Any]]
    epochs: int
    total_steps: int
    steps_per_epoch: int
    search_run_id: str | None
    lr_scales: list[float] = field(default_factory=lambda: [1.0])
    resumed_from_epoch: int = 0
    tracking_uri: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    best_config: BestConfig | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (what ``lrsearch train --json`` prints)."""
        data = asdict(self)
        data["seconds"] = round(self.seconds, 1)
        return data


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def run_final(job: JobConfig, *, search: SearchResult | str | None = None, epochs: int | None = None,
              steps: int | None = None, top_k: int = 1, lr_scales: Sequence[float] | str = "auto",
              register: str | None = None,
              resume: bool = False, task: Task | Callable[[], Task] | None = None,
              address: str | None = None, track: bool = True, tracking_uri: str | None = None,
              show_progress: bool = False) -> FinalResult:
    """Train the search's best config (or its ``top_k`` best) at the horizon; see :func:`lrsearch.train`."""
    started = time.perf_counter()
    check_options(epochs, steps, top_k, register, track, lr_scales)
    from lrsearch.tracking import resolve_tracking

    uri, experiment = resolve_tracking(tracking_uri or job.tracking.uri, job.tracking.experiment, job.name)
    check_job(job, own_task=task is not None, track=track, tracking_uri=uri)  # a missing extra: one line
    found = _read_search(search, uri, experiment, track)
    candidates = _candidates(found, top_k)
    notes = list(found.get("notes", []))
    if len(candidates) < top_k:
        notes.append(f"--top-k {top_k}: the search completed {len(candidates)} trial"
                     f"{'s' if len(candidates) != 1 else ''}; training {len(candidates)}")
    notes += _recipe_notes(job, found["best"])
    out = _final_dir(job)
    source = TaskSource.of(job, task)
    from lrsearch.tuning.tuner import check_resources, init_ray

    started_ray = init_ray(address, verbose=False)
    try:
        check_resources(job, joined=not started_ray)
        import ray

        remote = ray.remote(_train_on_worker).options(num_cpus=job.resources.cpu,
                                                      num_gpus=job.resources.gpu, max_retries=0)
        horizon = _get(remote.remote(source, candidates, epochs, steps, str(out), dry=True))
        lr_scales = resolve_scales(lr_scales, horizon, found["best"], notes)
        candidates = scaled(candidates, lr_scales)
        state = _load_state(out, resume, found, candidates, epochs, steps, notes)  # reads only
        state["uri"] = redact_uri(uri)  # a login comes from the environment, never a file
        if "done" not in state:  # a fresh run: what an earlier one left goes now, not before the checks
            _clear(out)
        run = None
        if track:
            from lrsearch.tracking.final import FinalRun

            params = {"search_run_id": found["run_id"], "top_k": len(candidates) // len(lr_scales),
                      "lr_scales": ",".join(f"{x:g}" for x in lr_scales),
                      "epochs": horizon["epochs"], "total_steps": horizon["total_steps"],
                      "steps_per_epoch": horizon["steps_per_epoch"],
                      "candidates": ",".join(c.trial_id for c in candidates),
                      **{f"train.{k}": v for k, v in recipe(job).to_dict().items()},
                      "task": horizon["task"], "task.num_train": getattr(job.task, "num_train", "-")}
            run = FinalRun.start(uri, experiment_id=found.get("experiment_id") or _experiment_id(uri, experiment),
                                 search_run_id=found["run_id"], job_name=job.name, params=params,
                                 run_id=state.get("run_id"))
            state["run_id"] = run.run_id
            state.pop("ended", None)  # a resumed run is running again
            state.pop("ended_logged", None)
        _save_state(out, state)
        try:
            ref = remote.remote(source, candidates, epochs, steps, str(out), run=run, register=register,
                                tags={"search_run_id": found["run_id"] or "-", "job": job.name})
            outcome = _get(ref, progress=out / "progress.json" if show_progress else None)
            best = trained_config(job, outcome)
            best_file = write_best_config(best, out)
            if run is not None:
                run.log_artifact(best_file)
        except BaseException:
            if run is not None:
                _end_run(run, out, "KILLED" if _interrupted() else "FAILED")
            raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if run is not None:
        _end_run(run, out, "FINISHED")
    result = FinalResult(**outcome, run_id=run.run_id if run else None, lr_scales=list(lr_scales),
                         search_run_id=found["run_id"], notes=notes, tracking_uri=redact_uri(uri) if track else None,
                         paths={"final": str(out), "model": str(out / "model.pt"), "best_config": str(best_file)},
                         best_config=best)
    result.seconds = time.perf_counter() - started
    (out / "result.json").write_text(json.dumps(result.summary(), indent=1, default=str))
    return result


def trained_config(job: JobConfig, outcome: dict[str, Any]) -> BestConfig:
    """The config a final run kept, as a best config found at its horizon: the export of a final run
    (``lrsearch export --run-id``) gives the ``max_lr`` and schedule the shipped model trained with
    (a ``--lr-scales`` or ``--top-k`` pick included), and ``lr_scales="auto"`` does not carry it
    down again at that horizon."""
    config, total = outcome["config"], outcome["total_steps"]
    name = config["schedule"]
    return BestConfig(schedule=name, max_lr=config["max_lr"], params=dict(config.get(name) or {}),
                      optimizer=trained_optimizer(job.optimizer.model_dump(mode="json"), config),
                      layer_decay=config.get("layer_decay"), metric=f"val_{outcome['metric']}",
                      value=outcome["val_metric"], trial_id=outcome["trial_id"],
                      search_horizon={"epochs": outcome["epochs"], "steps_per_epoch": outcome["steps_per_epoch"],
                                      "total_steps": total, "schedule_params": schedule_params(config, total)},
                      search_config=config, train=recipe(job).to_dict())


def _get(ref, progress: Path | None = None) -> Any:
    """The Ray task's result; lrsearch's own errors come back as themselves (one line, no remote
    traceback). With ``progress``, each epoch the task finishes is shown on stderr."""
    import ray
    from ray.exceptions import RayTaskError

    from lrsearch.errors import LRSearchError

    shown = None
    try:
        while progress is not None and not ray.wait([ref], timeout=1.0)[0]:
            if progress.is_file():
                line = progress.read_text()
                if line and line != shown:
                    from lrsearch.console import err

                    err.print(line, highlight=False)
                    shown = line
        return ray.get(ref)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LRSearchError):
            raise cause from None
        raise


def _interrupted() -> bool:
    import sys

    return isinstance(sys.exc_info()[1], KeyboardInterrupt)


def check_options(epochs: int | None, steps: int | None, top_k: int, register: str | None,
                  track: bool, lr_scales: Sequence[float] | str = "auto") -> None:
    if epochs is not None and steps is not None:
        raise ConfigError(f"give at most one of --epochs and --steps (got --epochs {epochs} and "
                          f"--steps {steps})")
    for name, value in (("--epochs", epochs), ("--steps", steps), ("--top-k", top_k)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name}: got {value!r}; allowed: an integer >= 1")
    if register is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,99}$", register):
        raise ConfigError(f"--register: got {register!r}; allowed: 1-100 letters, digits, '_', '.', "
                          "'-' or spaces, starting with a letter or digit")
    if register is not None and not track:
        raise ConfigError("--register: needs MLflow tracking (track=True)")
    if lr_scales == "auto":
        return
    scales = list(lr_scales) if isinstance(lr_scales, Sequence) and not isinstance(lr_scales, str) else None
    if not scales or len(set(scales)) != len(scales) or any(
            isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x < math.inf for x in scales):
        numbers = scales and all(isinstance(x, int | float) and not isinstance(x, bool) for x in scales)
        got = ",".join(f"{x:g}" for x in scales) if numbers else repr(lr_scales)
        raise ConfigError(f"--lr-scales: got {got}; allowed: 'auto', or distinct numbers > 0, the "
                          "multiples of each config's max_lr to train (e.g. 1,0.5,0.25)")


#: ``lr_scales="auto"``: a run at least BRIDGE_AT times the steps its config was searched at trains
#: each config at these multiples of its ``max_lr`` and keeps the best by validation
AUTO_SCALES = (1.0, 0.5, 0.25)
BRIDGE_AT = 4.0


def resolve_scales(lr_scales: Sequence[float] | str, horizon: dict[str, Any], best: dict[str, Any],
                   notes: list[str]) -> tuple[float, ...]:
    """``lr_scales``, with ``"auto"`` resolved against the horizon: :data:`AUTO_SCALES` when the run
    is at least :data:`BRIDGE_AT` times the steps the config was searched at (its
    ``search_horizon``), ``(1,)`` otherwise or when that horizon is unknown (a hand-written config).

    A longer run's best LR sits lower than a short trial's: on the final-run benchmark's text task
    (4x the steps) the 1x config scored 0.797 median test over 5 seeds, the best of 1x/0.5x/0.25x
    by validation 0.825 on the same seeds (BENCHMARKS.md, the horizon bridge); on image, where the search already hands over the
    grid's LR, validation kept 1x on 3 of 5 seeds and the median did not move. At 2x the steps it
    gains nothing for 3x the final run's cost (``bench/bridge_horizon.py``: against 1x text 3/4/2 over
    9 seeds, image 1/3/1, median +0.0 on both), so it starts at 4x, where it was measured to pay.
    """
    if not isinstance(lr_scales, str):
        return tuple(float(x) for x in lr_scales)
    searched = (best.get("search_horizon") or {}).get("total_steps")
    if not searched or horizon["total_steps"] < BRIDGE_AT * searched:
        return (1.0,)
    notes.append(f"lr_scales auto: {horizon['total_steps']} steps is {horizon['total_steps'] / searched:.1f}x "
                 f"the {searched} the config was searched at, so each config trains at "
                 f"{', '.join(f'{x:g}x' for x in AUTO_SCALES)} its max_lr and validation keeps the best "
                 "(--lr-scales 1: one run)")
    return AUTO_SCALES


def scaled(candidates: list[Candidate], lr_scales: Sequence[float]) -> list[Candidate]:
    """Each candidate at each multiple of its ``max_lr``, in order (``1``: the config as found).

    A longer run's best LR sits lower than a short trial's (BENCHMARKS.md, the final-run benchmark:
    on text the grid's best at the final horizon is 1e-4 where the searches hand over 4e-4..7e-4),
    so ``--lr-scales 1,0.5,0.25`` lets the final run's validation decide how far to carry it down.
    Measured there over 5 seeds: text's median test 0.797 -> 0.825 (the grid oracle: 0.823), image's
    0.799 -> 0.799 (its search already hands over the grid's LR).
    """
    return [Candidate(c.trial_id if x == 1 else f"{c.trial_id}@{x:g}x",
                      {**c.config, "max_lr": c.config["max_lr"] * x}, c.search_value)
            for c in candidates for x in lr_scales]


def _read_search(search: SearchResult | str | None, uri: str, experiment: str, track: bool) -> dict[str, Any]:
    """``{run_id, experiment_id, best, trials: [{trial_id, state, config, final_metric}], mode}``."""
    if isinstance(search, SearchResult):
        if search.best is None:
            raise SearchError("search: it has no completed trial: nothing to train (every trial was "
                              "pruned, diverged or failed)")
        tracking = search.tracking or {}
        trials = [{"trial_id": t.trial_id, "state": t.state.value, "config": t.config,
                   "final_metric": t.final_metric} for t in ranked_completed(search.trials, search.mode)]
        return {"run_id": tracking.get("run_id"), "experiment_id": tracking.get("experiment_id"),
                "best": search.best.to_dict(), "trials": trials, "mode": search.mode}
    if isinstance(search, BestConfig | Mapping):
        return given_config(search)
    if search is not None and not isinstance(search, str):
        raise ConfigError(f"search: got {type(search).__name__}; allowed: a SearchResult, a config "
                          "({max_lr, schedule, params}), an MLflow run id, an experiment name, or None "
                          "(the job's latest search)")
    if not track and search is None:
        raise ConfigError("search: without MLflow (track=False) give the SearchResult to train")
    from lrsearch.tracking.final import read_search

    if search is not None and _RUN_ID.match(search):
        found = read_search(uri, run_id=search)
    else:
        found = read_search(uri, experiment=search or experiment)
    for row in found["trials"]:
        if isinstance(row.get("config"), str):
            row["config"] = json.loads(row["config"])
    return found


def given_config(given: BestConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A config to train without a search: a :class:`BestConfig`, its ``to_dict()`` or an exported
    YAML's (``schedule``, ``max_lr``, ``params``), or a trial config (``{max_lr, schedule,
    <schedule>: {...}}``). Checked here, before anything trains."""
    data = given.to_dict() if isinstance(given, BestConfig) else dict(given)
    missing = [k for k in ("max_lr", "schedule") if k not in data]
    if missing:
        raise ConfigError(f"search: the config has no {' or '.join(missing)}; allowed: a mapping with "
                          "max_lr, schedule and (optionally) params, the schedule's parameters")
    name, max_lr = data["schedule"], data["max_lr"]
    if isinstance(max_lr, bool) or not isinstance(max_lr, int | float) or not 0 < max_lr < math.inf:
        raise ConfigError(f"search: max_lr={max_lr!r}; allowed: a number > 0")
    params = data.get("params", data.get(name)) or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"search: params={params!r}; allowed: a mapping of the schedule's parameters")
    config = {"max_lr": float(max_lr), "schedule": name, name: dict(params)}
    for key in ("layer_decay", "weight_decay"):
        if data.get(key) is not None:
            config[key] = data[key]
    if isinstance(data.get("search_config"), Mapping) and data["search_config"].get("schedule") == name:
        config = {**data["search_config"], **config}  # a BestConfig's trial: its searched weight decay too
    try:
        schedule_params(config, 1000)
    except ValueError as exc:
        raise ConfigError(f"search: {exc}") from None
    best = {"trial_id": "config", "schedule": name, "max_lr": config["max_lr"], "params": dict(params),
            "search_config": config, "value": None, "train": data.get("train") or {},
            "search_horizon": data["search_horizon"] if isinstance(data.get("search_horizon"), Mapping) else None}
    return {"run_id": None, "experiment_id": None, "best": best, "mode": None,
            "trials": [{"trial_id": "config", "state": TrialState.COMPLETED.value, "config": config,
                        "final_metric": None}]}


def _candidates(found: dict[str, Any], top_k: int) -> list[Candidate]:
    best = found["best"]
    mode = found.get("mode") or _infer_mode(found)
    done = [t for t in found["trials"] if t.get("state") == TrialState.COMPLETED.value
            and (t.get("final_metric") is not None or t["trial_id"] == best["trial_id"])]
    done.sort(key=lambda t: t["final_metric"], reverse=mode == "max")
    # the best config first, whatever the table's order of ties
    first = [t for t in done if t["trial_id"] == best["trial_id"]]
    rest = [t for t in done if t["trial_id"] != best["trial_id"]]
    rows = (first + rest)[:top_k]
    if not rows:  # a search logged without its trial table: its best config alone
        rows = [{"trial_id": best["trial_id"], "config": best.get("search_config") or {},
                 "final_metric": best.get("value")}]
    out = []
    for row in rows:
        config = dict(row["config"] or {})
        if "max_lr" not in config or "schedule" not in config:
            raise SearchError(f"search: trial {row['trial_id']} has no config to train (max_lr, "
                              "schedule); was it logged by this version of lrsearch?")
        out.append(Candidate(row["trial_id"], config, row.get("final_metric")))
    return out


def _infer_mode(found: dict[str, Any]) -> str:
    values = [t["final_metric"] for t in found["trials"] if t.get("final_metric") is not None]
    best = found["best"].get("value")
    return "min" if values and best is not None and best == min(values) and best != max(values) else "max"


def _recipe_notes(job: JobConfig, best: dict[str, Any]) -> list[str]:
    searched, now = best.get("train") or {}, recipe(job).to_dict()
    if not searched or searched == now:
        return []
    differ = ", ".join(f"{k} {searched.get(k)!r} -> {v!r}" for k, v in now.items() if searched.get(k) != v)
    return [f"the job's train recipe differs from the search's ({differ}): the final run uses the job's"]


def _experiment_id(uri: str, experiment: str) -> str:
    from lrsearch.tracking.store import _client, new_experiment

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return exp.experiment_id if exp else new_experiment(client, uri, experiment)


def _final_dir(job: JobConfig) -> Path:
    root = job.results_dir()
    base = Path(root) if "://" not in root else Path("lrsearch-runs") / job.name
    return base / FINAL_DIR


def _load_state(out: Path, resume: bool, found: dict[str, Any], candidates: list[Candidate],
                epochs: int | None, steps: int | None, notes: list[str]) -> dict[str, Any]:
    """What a resumed run continues (its MLflow run, the candidates done), or a fresh state."""
    fresh = {"search_run_id": found["run_id"], "candidates": [c.trial_id for c in candidates],
             "epochs": epochs, "steps": steps}
    file = out / "state.json"
    if resume and file.is_file():
        saved = json.loads(file.read_text())
        for key, value in fresh.items():
            if saved.get(key) != value:
                raise SearchError(f"--resume: the final run in {out} trained {key}={saved.get(key)!r}, "
                                  f"not {value!r}; resume it as it was, or start afresh without --resume")
        saved.setdefault("done", {})  # marks a resumed run: its directory is kept
        return saved
    if resume:
        notes.append(f"--resume: no final run had been saved in {out}; starting from the beginning")
    return fresh


def _clear(out: Path) -> None:
    """An empty final-run directory; an earlier run killed there is closed in MLflow."""
    if out.exists():
        _close_killed_run(out)
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _close_killed_run(out: Path) -> None:
    # an earlier final run killed mid-way, replaced by this one: no MLflow run is left RUNNING
    file = out / "state.json"
    if not file.is_file():
        return
    saved = json.loads(file.read_text())
    if saved.get("run_id") and saved.get("uri"):
        from lrsearch.tracking.store import _client

        try:
            client = _client(saved["uri"])
            if client.get_run(saved["run_id"]).info.status == "RUNNING":
                client.set_terminated(saved["run_id"], "KILLED")
        except Exception:
            return


def _end_run(run: Any, out: Path, status: str) -> None:
    """End the final run's MLflow run; a store that is down gets the end from the next lrsearch
    command on the job (``lrsearch.tracking.heal`` reads it from ``state.json``)."""
    if run.finish(status):
        return
    file = out / "state.json"
    state = json.loads(file.read_text()) if file.is_file() else {"run_id": run.run_id}
    state.update(ended=status, ended_logged=False)  # re-read: the worker wrote what it trained
    _save_state(out, state)


def _save_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out / "state.json")


# --------------------------------------------------------------------------------------------
# The Ray task: train, select, test, log
# --------------------------------------------------------------------------------------------


def _horizon(job: JobConfig, task: Task, epochs: int | None, steps: int | None) -> dict[str, Any]:
    """The horizon in optimizer steps: ``--steps``, or ``--epochs`` (default: the search's
    ``max_epochs``) whole passes over the train loader."""
    per_epoch = loader_steps(job, task)
    total = steps if steps is not None else per_epoch * (epochs or job.search.max_epochs)
    return {"epochs": math.ceil(total / per_epoch), "total_steps": total, "steps_per_epoch": per_epoch,
            "task": task.name}


def _train_on_worker(source: TaskSource, candidates: list[Candidate], epochs: int | None,
                     steps: int | None, out: str, *, run=None, register: str | None = None,
                     tags: dict[str, str] | None = None, dry: bool = False) -> dict[str, Any]:
    """Train every candidate at the horizon, keep the best by validation, test it, log it.

    With ``dry`` only the horizon (the task is built here, where it trains, so a bad
    ``--steps`` or accumulation fails before the MLflow run opens)."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    job, task = source.job, source.get()
    horizon = _horizon(job, task, epochs, steps)
    if dry:
        return horizon
    device, out_dir = trial_device(), Path(out)
    key = metric_key(task)
    state = json.loads((out_dir / "state.json").read_text())
    done: dict[str, dict[str, Any]] = state.setdefault("done", {})
    resumed_from = 0
    for i, cand in enumerate(candidates):
        if cand.trial_id in done:  # a resume: this one finished before the kill (its last epoch)
            resumed_from = max(resumed_from, done[cand.trial_id]["epochs"])
            continue
        prefix = f"top{i + 1}." if len(candidates) > 1 else ""
        report, start = _train_one(job, task, cand, horizon, out_dir, device, run, prefix)
        resumed_from = max(resumed_from, start)
        done[cand.trial_id] = report
        _save_state(out_dir, state)

    finished = [(c, done[c.trial_id]) for c in candidates if not done[c.trial_id]["diverged"]]
    if not finished:
        if run is not None:
            run.log(tags={"lrsearch.state": "diverged"})
        raise SearchError(f"the final run diverged for every config trained ({len(candidates)}): NaN or "
                          f"exploding loss at the {horizon['total_steps']}-step horizon; try --top-k "
                          "with more configs, or a shorter horizon")
    pick = (max if task.mode == "max" else min)(finished, key=lambda cr: cr[1]["val_metric"])
    chosen, report = pick
    model, stepper = _model_for(job, task, chosen, horizon, device)
    model.load_state_dict(torch.load(out_dir / f"{chosen.trial_id}.final.pt", map_location=device,
                                     weights_only=False), strict=False)
    test = None
    if task.test_loader is not None:
        test = evaluate(model, task, device, loader=task.test_loader, autocast=stepper.autocast)
    torch.save(model.state_dict(), out_dir / "model.pt")
    for cand in candidates:  # the others' weights are not needed any more
        if cand.trial_id != chosen.trial_id:
            (out_dir / f"{cand.trial_id}.final.pt").unlink(missing_ok=True)
    model_uri, registered = None, None
    if run is not None:
        # one config: its epochs logged these already; top-k: the chosen one's, unprefixed
        final = {key: report["val_metric"], "val_loss": report["val_loss"]} if len(candidates) > 1 else {}
        if test is not None:
            final.update({f"test_{task.metric}": test[task.metric], "test_loss": test["loss"]})
        run.log(metrics=final, step=horizon["epochs"],
                params={"trial_id": chosen.trial_id, "max_lr": chosen.config["max_lr"],
                        "schedule": chosen.config["schedule"],
                        **{f"{chosen.config['schedule']}.{k}": v
                           for k, v in (chosen.config.get(chosen.config["schedule"]) or {}).items()}},
                tags={"lrsearch.state": "finished"})
        version_tags = {**(tags or {}), "trial_id": chosen.trial_id, "run_id": run.run_id,
                        "config": json.dumps(chosen.config, sort_keys=True, default=str),
                        f"val_{task.metric}": f"{report['val_metric']:.6g}"}
        if test is not None:
            version_tags[f"test_{task.metric}"] = f"{test[task.metric]:.6g}"
        model_uri, registered = run.log_model(model.cpu().eval(), register=register, tags=version_tags,
                                              input_example=_input_example(task))
    return {"test_metric": None if test is None else test[task.metric],
            "test_loss": None if test is None else test["loss"], "val_metric": report["val_metric"],
            "metric": task.metric, "mode": task.mode, "model_uri": model_uri, "registered": registered,
            "trial_id": chosen.trial_id, "config": chosen.config,
            "candidates": [{"trial_id": c.trial_id, "search_value": c.search_value, **done[c.trial_id]}
                           for c in candidates],
            "epochs": horizon["epochs"], "total_steps": horizon["total_steps"],
            "steps_per_epoch": horizon["steps_per_epoch"], "resumed_from_epoch": resumed_from}


def _input_example(task: Task) -> Any:
    """Two validation inputs as a numpy array, for a model that takes one tensor (``None`` for
    models taking a mapping, such as Hugging Face ones: no example, no signature)."""
    inputs = next(iter(task.val_loader))[0]
    return inputs[:2].float().cpu().numpy() if isinstance(inputs, torch.Tensor) else None


def _model_for(job: JobConfig, task: Task, cand: Candidate, horizon: dict[str, Any],
               device: torch.device):
    model, optimizer, _, _ = build_trial(job, task, cand.config, device, horizon["total_steps"])
    return model, Stepper(recipe(job), model, optimizer, task.criterion, device)


def _train_one(job: JobConfig, task: Task, cand: Candidate, horizon: dict[str, Any], out: Path,
               device: torch.device, run, prefix: str) -> tuple[dict[str, Any], int]:
    """One config over the whole horizon, an epoch checkpoint after each epoch. Returns its report
    (``val_metric``, ``val_loss``, ``diverged``, ``epochs``) and the epoch it started from."""
    total, per_epoch, key = horizon["total_steps"], horizon["steps_per_epoch"], metric_key(task)
    torch.manual_seed(job.search.seed)
    model, optimizer, scheduler, _ = build_trial(job, task, cand.config, device, total)
    stepper = Stepper(recipe(job), model, optimizer, task.criterion, device)
    monitor = DivergenceMonitor(factor=job.search.diverge_factor, smooth=job.search.diverge_smooth,
                                reference="first")
    ckpt, start = out / f"{cand.trial_id}.pt", 0
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        load_state(saved, stepper, scheduler, monitor)
        start = saved["epoch"]
    metrics: dict[str, float] = {}
    diverged = False
    logged = run.logged_epochs(f"{prefix}{key}") if run is not None and start else 0
    for epoch in range(start, horizon["epochs"]):
        log = run is not None and epoch + 1 > logged  # killed after logging it, before its checkpoint
        reseed(task, job.search.seed * 1_000_003 + epoch)  # as a trial: the same batches per epoch
        budget = min(per_epoch, total - epoch * per_epoch)
        train_loss, _, diverged, lrs = train_epoch(stepper, scheduler, task, monitor, budget)
        if log:
            run.log(series=(f"{prefix}lr_step", lrs, epoch * per_epoch))
        if diverged:
            metrics = {"val_loss": 1e9, task.metric: _worst(task)}
            if log:
                run.log(metrics={f"{prefix}train_loss": train_loss, f"{prefix}diverged": 1.0}, step=epoch + 1)
            break
        # schedule-free: its averaged weights; BatchNorm statistics recomputed where asked
        eval_mode(optimizer, model, task.train_loader, device=device, recompute_bn=stepper.recipe.recompute_bn)
        metrics = evaluate(model, task, device, autocast=stepper.autocast)
        if log:
            run.log(metrics={f"{prefix}{key}": metrics[task.metric], f"{prefix}val_loss": metrics["loss"],
                             f"{prefix}train_loss": train_loss,
                             f"{prefix}lr": max(g["lr"] for g in optimizer.param_groups)}, step=epoch + 1)
        (out / "progress.json").write_text(
            f"final run: trial {cand.trial_id}{f' ({prefix[:-1]})' if prefix else ''}, epoch {epoch + 1}/"
            f"{horizon['epochs']}: train loss {train_loss:.4f}, {key} {metrics[task.metric]:.4f}")
        state = {"model": trainable_state(model), "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "monitor": monitor.state_dict(),
                 "stepper": stepper.state_dict(), "metrics": metrics}
        torch.save(state, out / f"{cand.trial_id}.pt.tmp")
        os.replace(out / f"{cand.trial_id}.pt.tmp", ckpt)
    if not metrics and ckpt.is_file():  # resumed after its last epoch was saved
        metrics = torch.load(ckpt, map_location="cpu", weights_only=False).get("metrics", {})
    if not diverged:
        torch.save(trainable_state(model), out / f"{cand.trial_id}.final.pt")
    ckpt.unlink(missing_ok=True)
    return ({"val_metric": metrics.get(task.metric, _worst(task)), "val_loss": metrics.get("loss", 1e9),
             "diverged": diverged, "epochs": horizon["epochs"]}, start)


def _worst(task: Task) -> float:
    from lrsearch.trial import worst_value

    return worst_value(task)
