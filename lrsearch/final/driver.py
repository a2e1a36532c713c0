"""The final run (``lrsearch train``): the search's best config trained at the user's horizon.

The driver reads the search back (a :class:`SearchResult`, or MLflow: a run id, an experiment's
latest search, by default the job's own), checks the horizon, opens the MLflow run (nested under the
search's parent) and hands the training to one Ray task with the job's ``resources`` (the GPU Ray
grants, CUDA when it does). That task trains each of the top-k configs for the whole horizon, the
trials' way: the same model factory, optimizer, schedule resolved for the horizon's optimizer steps
through :func:`lrsearch.job.space.schedule_params` (the conversion the export gives users), the same
recipe (clipping, precision, accumulation) and divergence stop. It keeps the best by validation,
scores that one, once, on the task's held-out test split (which the search never saw), and logs
the model (MLflow's pytorch flavour; a registry version with ``register``).

Every epoch leaves a checkpoint under ``STORAGE/NAME/final/``, so ``resume`` continues a run that
was killed where it stopped: the same MLflow run, the epochs done kept.
"""


from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lrsearch.console import err
from lrsearch.engine import Horizon, Training
from lrsearch.engine.trial import TaskSource
from lrsearch.errors import LRSearchError
from lrsearch.final.found import (
    Candidate,
    FoundSearch,
    candidates,
    check_options,
    range_test_found,
    read_found,
    resolve_scales,
    scaled,
)
from lrsearch.final.state import clear, end_run, final_dir, load_state, save_state
from lrsearch.final.worker import (
    MIN_STEPS_PER_DECADE,
    Plan,
    RangeTestPlan,
    halving_rungs,
    train_on_worker,
)
from lrsearch.infra.ray_runtime import check_resources, init_ray
from lrsearch.infra.tracking import heal, resolve_tracking
from lrsearch.infra.tracking.final import FinalRun
from lrsearch.infra.tracking.store import _client, new_experiment
from lrsearch.job.config import JobConfig
from lrsearch.job.extras import check_job
from lrsearch.job.space import schedule_params
from lrsearch.optim.recipe import Recipe
from lrsearch.output.results import BestConfig, SearchResult, trained_optimizer, write_best_config
from lrsearch.redact import redact_uri
from lrsearch.tasks import Task

__all__ = ["FinalResult", "run_final", "trained_config"]


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
        halving: whether they were halved on the way (``None`` resolved).
        range_test: with ``range_test=True``, the range test that gave the LR: ``steps`` asked,
            ``steps_run``, its bounds ``low`` and ``high``, ``suggestions`` and the ``max_lr`` taken.
        steps_trained: the optimizer steps the run took, every candidate's and every cooldown
            branch's (``halving``) included.
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
    halving: bool = False
    range_test: dict[str, Any] | None = None
    steps_trained: int = 0
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



def run_final(job: JobConfig, *, search: SearchResult | str | None = None, epochs: int | None = None,
              steps: int | None = None, top_k: int = 1, lr_scales: Sequence[float] | str = "auto",
              halving: bool | None = None, range_test: bool = False, register: str | None = None,
              resume: bool = False, task: Task | Callable[[], Task] | None = None,
              address: str | None = None, track: bool = True, tracking_uri: str | None = None,
              show_progress: bool = False) -> FinalResult:
    """Train the search's best config (or its ``top_k`` best) at the horizon; see :func:`lrsearch.train`."""
    started = time.perf_counter()
    check_options(epochs, steps, top_k, register, track, lr_scales, range_test=range_test, searched=search is not None)

    uri, experiment = resolve_tracking(tracking_uri or job.tracking.uri, job.tracking.experiment, job.name)
    check_job(job.task, uri, own_task=task is not None, track=track)  # a missing extra: one line
    if track:  # what MLflow missed of this job's last search and final run, first
        heal(job.results_dir(), uri=uri)
    found = range_test_found(job.search_space()) if range_test else read_found(search, uri, experiment, track)
    chosen, recipe = candidates(found, top_k), Recipe.of(job.train)
    notes = _notes(top_k, chosen, recipe, found.best)
    out = final_dir(job.results_dir())
    source = TaskSource.of(job.task, job.base_dir, task)
    spec = RangeTestPlan(job.range_test, found.best["max_lr"]) if range_test else None
    plan = Plan(Training.of(job.train, job.optimizer, job.search), tuple(chosen), epochs, steps, job.search.max_epochs,
                range_test=spec)
    started_ray = init_ray(address, verbose=False)
    try:
        check_resources(job.resources, joined=not started_ray)
        import ray

        remote = ray.remote(train_on_worker).options(num_cpus=job.resources.cpu, num_gpus=job.resources.gpu,
                                                     max_retries=0)
        dry = _get(remote.remote(source, plan, str(out), dry=True))
        horizon: Horizon = dry["horizon"]
        plan, lr_scales = _at_horizon(plan, chosen, horizon, lr_scales, halving, found.best, notes)
        halving = plan.halving
        params = {"search_run_id": found.run_id, "top_k": len(chosen), "lr_scales": ",".join(f"{x:g}" for x in lr_scales),
                  "halving": halving, **_horizon_params(horizon, plan, recipe), "task": dry["task"],
                  "task.num_train": getattr(job.task, "num_train", "-")}
        run = _open(out, found, plan, resume, notes, uri, experiment, job.name, params if track else None)
        try:
            ref = remote.remote(source, plan, str(out), run=run, register=register,
                                tags={"search_run_id": found.run_id or "-", "job": job.name})
            outcome = _get(ref, progress=out / "progress.json" if show_progress else None)
            if outcome["range_test"]:
                notes.append(_range_test_note(outcome["range_test"], job.range_test.num_steps == "auto",
                                              round(spec.share * horizon.total_steps)))
            best = trained_config(job.optimizer.model_dump(mode="json"), recipe, outcome)
            best_file = write_best_config(best, out)
            if run is not None:
                run.log_artifact(best_file)
        except BaseException:
            if run is not None:
                end_run(run, out, "KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
            raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if run is not None:
        end_run(run, out, "FINISHED")
    result = FinalResult(**outcome, run_id=run.run_id if run else None, lr_scales=list(lr_scales), halving=halving,
                         search_run_id=found.run_id, notes=notes, tracking_uri=redact_uri(uri) if track else None,
                         paths={"final": str(out), "model": str(out / "model.pt"), "best_config": str(best_file)},
                         best_config=best)
    result.seconds = time.perf_counter() - started
    (out / "result.json").write_text(json.dumps(result.summary(), indent=1, default=str))
    return result


def _at_horizon(plan: Plan, chosen: list[Candidate], horizon: Horizon, lr_scales: Sequence[float] | str,
                halving: bool | None, best: dict[str, Any], notes: list[str]) -> tuple[Plan, list[float]]:
    """The plan at the horizon the worker measured: ``lr_scales`` resolved (``auto``), each config
    at each scale, and whether they are halved on the way (``None``: from the horizon)."""
    lr_scales, halving = resolve_scales(lr_scales, horizon.total_steps, best, notes, halving)
    plan = replace(plan, candidates=tuple(scaled(chosen, lr_scales)), halving=halving)
    if halving and not halving_rungs(len(plan.candidates), horizon.epochs):
        notes.append(f"halving: {len(plan.candidates)} config(s) over {horizon.epochs} epoch(s): nothing to "
                     "halve (it needs 2 or more configs and epochs); each trains the whole horizon")
    return plan, list(lr_scales)


def _range_test_note(rt: dict[str, Any], auto: bool, quarter: int) -> str:
    why = ("range_test.num_steps" if not auto else "a quarter of the run" if rt["steps"] <= quarter
           else f"{MIN_STEPS_PER_DECADE:g} a decade of its sweep; a quarter of the run is {quarter}")
    return (f"range test: {rt['steps']} steps ({why}) on its data; bounds {rt['low']:.2g}..{rt['high']:.2g}, "
            f"LR {rt['max_lr']:.3g}")


def _horizon_params(horizon: Horizon, plan: Plan, recipe: Recipe) -> dict[str, Any]:
    """The final run's MLflow params on what it trains: the horizon, the candidates, the recipe."""
    return {"epochs": horizon.epochs, "total_steps": horizon.total_steps, "steps_per_epoch": horizon.steps_per_epoch,
            "candidates": ",".join(c.trial_id for c in plan.candidates),
            **{f"train.{k}": v for k, v in recipe.to_dict().items()}}


def _open(out: Path, found: FoundSearch, plan: Plan, resume: bool, notes: list[str], uri: str, experiment: str,
          job_name: str, params: dict[str, Any] | None):
    """The run's directory (kept when resumed, emptied otherwise) and its MLflow run (``params``:
    logged on a new one; ``None``: untracked): the :class:`~lrsearch.infra.tracking.final.FinalRun`."""
    fresh = {"search_run_id": found.run_id, "candidates": [c.trial_id for c in plan.candidates],
             "epochs": plan.epochs, "steps": plan.steps, "halving": plan.halving}
    state = load_state(out, resume, fresh, notes)  # reads only
    state["uri"] = redact_uri(uri)  # a login comes from the environment, never a file
    if "done" not in state:  # a fresh run: what an earlier one left goes now, not before the checks
        clear(out)
    run = None
    if params is not None:
        run = FinalRun.start(uri, experiment_id=found.experiment_id or _experiment_id(uri, experiment),
                             search_run_id=found.run_id, job_name=job_name, params=params,
                             run_id=state.get("run_id"))
        state["run_id"] = run.run_id
        state.pop("ended", None)  # a resumed run is running again
        state.pop("ended_logged", None)
    save_state(out, state)
    return run


def trained_config(optimizer: dict[str, Any], recipe: Recipe, outcome: dict[str, Any]) -> BestConfig:
    """The config a final run kept, as a best config found at its horizon: the export of a final run
    (``lrsearch export --run-id``) gives the ``max_lr`` and schedule the shipped model trained with
    (a ``--lr-scales`` or ``--top-k`` pick included), and ``lr_scales="auto"`` does not carry it
    down again at that horizon. ``optimizer``: the job's section, as JSON."""
    config, total = outcome["config"], outcome["total_steps"]
    name = config["schedule"]
    return BestConfig(schedule=name, max_lr=config["max_lr"], params=dict(config.get(name) or {}),
                      optimizer=trained_optimizer(optimizer, config),
                      layer_decay=config.get("layer_decay"), metric=f"val_{outcome['metric']}",
                      value=outcome["val_metric"], trial_id=outcome["trial_id"],
                      search_horizon={"epochs": outcome["epochs"], "steps_per_epoch": outcome["steps_per_epoch"],
                                      "total_steps": total, "schedule_params": schedule_params(config, total)},
                      search_config=config, train=recipe.to_dict())


def _get(ref, progress: Path | None = None) -> Any:
    """The Ray task's result; lrsearch's own errors come back as themselves (one line, no remote
    traceback). With ``progress``, each epoch the task finishes is shown on stderr."""
    import ray
    from ray.exceptions import RayTaskError

    shown = None
    try:
        while progress is not None and not ray.wait([ref], timeout=1.0)[0]:
            if progress.is_file():
                line = progress.read_text()
                if line and line != shown:
                    err.print(line, highlight=False)
                    shown = line
        return ray.get(ref)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LRSearchError):
            raise cause from None
        raise


def _notes(top_k: int, chosen: list[Candidate], recipe: Recipe, best: dict[str, Any]) -> list[str]:
    """What the run says before it trains: fewer candidates than ``--top-k``, another recipe."""
    notes = []
    if len(chosen) < top_k:
        notes.append(f"--top-k {top_k}: the search completed {len(chosen)} trial"
                     f"{'s' if len(chosen) != 1 else ''}; training {len(chosen)}")
    searched, now = best.get("train") or {}, recipe.to_dict()
    if searched and searched != now:
        differ = ", ".join(f"{k} {searched.get(k)!r} -> {v!r}" for k, v in now.items() if searched.get(k) != v)
        notes.append(f"the job's train recipe differs from the search's ({differ}): the final run uses the job's")
    return notes


def _experiment_id(uri: str, experiment: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return exp.experiment_id if exp else new_experiment(client, uri, experiment)
