"""Warm start (``search.warm_start``): seed a new search's Optuna study with the finished trials of
earlier searches, so TPE starts from what they learnt instead of from random startup trials.

Where past trials come from: the earlier searches' MLflow runs in this job's tracking store. Each
trial's child run holds its sampled parameters, its final state (tag ``lrsearch.state``) and the
objective per epoch. MLflow rather than an earlier search's ``optuna.db``: a team shares its
tracking server, not each other's results directories, and every tracked search has these runs
(on remote storage too, where no ``optuna.db`` is written).

What is kept: completed trials (their last epoch's value), pruned and diverged ones (Optuna
PRUNED, their per-epoch values as intermediate values, as a search tells its own trials), when the
earlier search optimised the same metric over the same ``max_epochs`` and every parameter fits
this search's space (the same names, each value inside its distribution). Errored and unfinished
trials carry no value. Every trial left out is counted under its reason.

When: once, as the searcher is built for a fresh search (:class:`PrunedAwareOptunaSearch`); a
resumed search restores its study, seeds included, from ``optuna.db``. TPE counts the seeded
trials in its ``n_startup_trials``, so with enough of them its first suggestion is already its own.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrsearch.errors import ConfigError
from lrsearch.infra.tracking import find_past_search, read_trial_runs
from lrsearch.job.space import SearchSpace, SpaceSampler

__all__ = ["PastSearch", "read_past_searches", "saved_report", "seed_trials", "write_report"]

REPORT_FILE = "warm_start.json"


@dataclass(frozen=True)
class PastSearch:
    """An earlier search as read from MLflow: what ``search.warm_start`` named, its parent run,
    its objective and horizon, and its trial runs (:func:`lrsearch.infra.tracking.read_trial_runs`)."""

    ref: str
    run_id: str
    metric: str | None
    max_epochs: int | None
    trials: list[dict[str, Any]]


def read_past_searches(refs: list[str], tracking_uri: str) -> list[PastSearch]:
    """Every search ``refs`` names, with its trials, read before anything starts.

    Raises:
        ConfigError: naming ``search.warm_start``, the value and what is allowed, for an unknown
            experiment or run id, a run that is not a search, or one that has not finished.
        TrackingError: the tracking store cannot be reached.
    """

    past = []
    for ref in refs:
        try:
            run = find_past_search(tracking_uri, ref)
        except LookupError as exc:
            raise ConfigError(f"search.warm_start: got {ref!r}; {exc}; allowed: the name of an experiment "
                              "with a finished search, or the MLflow run id of a finished search or of "
                              "one of its trials") from None
        params = run.data.params
        metric = params.get("metric")
        epochs = params.get("max_epochs")
        past.append(PastSearch(ref=ref, run_id=run.info.run_id, metric=metric,
                               max_epochs=int(epochs) if epochs else None,
                               trials=read_trial_runs(tracking_uri, run, metric) if metric else []))
    return past


def seed_trials(past: list[PastSearch], space: SearchSpace, *, metric: str, max_epochs: int,
                worst: float) -> tuple[list[Any], dict[str, Any]]:
    """The Optuna trials that seed the new study, and the report of what was reused.

    Args:
        past: the earlier searches (:func:`read_past_searches`).
        space: the new search's space; trials outside it are dropped.
        metric, max_epochs: the new search's objective and horizon; a search with others is dropped.
        worst: the value a diverged trial reports at the epoch it diverged (what this search's own
            diverged trials report, so TPE ranks them alike).

    Returns:
        ``(trials, report)``; the report has ``reused``, ``dropped`` and per search (``sources``)
        its ``ref``, ``run_id``, ``trials``, ``reused`` by state and ``dropped`` by reason.
    """
    seeds, sources, seen = [], [], set()
    for search in past:
        whole = _whole_search_reason(search, metric, max_epochs, seen)
        seen.add(search.run_id)
        kept: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        for t in search.trials:
            trial = whole or _to_optuna(t, space, max_epochs, worst, search.ref)
            if isinstance(trial, str):
                dropped[trial] += 1
            else:
                seeds.append(trial)
                kept["diverged" if trial.user_attrs["diverged"] else trial.state.name.lower()] += 1
        sources.append({"ref": search.ref, "run_id": search.run_id, "trials": len(search.trials),
                        "reused": sum(kept.values()), "completed": kept["complete"],
                        "pruned": kept["pruned"], "diverged": kept["diverged"], "dropped": dict(dropped)})
    report = {"reused": len(seeds), "dropped": sum(sum(s["dropped"].values()) for s in sources),
              "sources": sources}
    return seeds, report


def _whole_search_reason(search: PastSearch, metric: str, max_epochs: int, seen: set[str]) -> str | None:
    """Why no trial of ``search`` fits (values of another objective or horizon do not compare)."""
    if search.run_id in seen:
        return "the same search as an earlier warm_start entry"
    if search.metric != metric:
        return f"its metric is {search.metric}, not {metric}"
    if search.max_epochs != max_epochs:
        return f"its max_epochs is {search.max_epochs}, not {max_epochs}"
    return None


def _to_optuna(t: dict[str, Any], space: SearchSpace, max_epochs: int, worst: float, ref: str) -> Any:
    """One trial run as an Optuna ``FrozenTrial`` of the new space, or the reason it does not fit."""
    from optuna.trial import TrialState, create_trial

    state = t["state"] or ""
    if state == "errored":
        return "errored"
    if state != "completed" and state != "diverged" and not state.startswith("pruned"):
        return "not finished (its search was interrupted)"
    params = _optuna_params(t["params"])
    distributions = _distributions(params, space)
    if isinstance(distributions, str):
        return distributions
    for name, dist in distributions.items():
        value = _inside(dist, params.get(name))
        if value is None:
            return f"{name} outside this space" if name in params else f"no {name} (this space searches it)"
        params[name] = value
    extra = sorted(set(params) - set(distributions))
    if extra:
        return f"{extra[0]} not in this space"
    history = {int(step): float(v) for step, v in t["history"].items()}
    stopped = int(t["stopped_at_epoch"] or max(history, default=0))
    if state == "diverged":
        history[stopped] = worst
    if not history or (state == "completed" and max_epochs not in history):
        return "no value logged"
    complete = state == "completed"
    return create_trial(
        state=TrialState.COMPLETE if complete else TrialState.PRUNED,
        value=history[max_epochs] if complete else history[max(history)],
        params=params, distributions=distributions, intermediate_values=history,
        user_attrs={"warm_start": ref, "warm_start_run_id": t["run_id"], "diverged": state == "diverged",
                    "stopped_at": stopped})


def _optuna_params(logged: dict[str, str]) -> dict[str, Any]:
    """MLflow params of a trial run (``cosine.warmup_frac``: text) -> Optuna's (``cosine/warmup_frac``)."""
    schedule = logged.get("schedule")
    params: dict[str, Any] = {}
    for key, text in logged.items():
        if key.startswith("schedule_params."):  # the steps resolved for the search's horizon
            continue
        if key == "schedule":
            params[key] = text
            continue
        name = f"{schedule}/{key.removeprefix(f'{schedule}.')}" if key.startswith(f"{schedule}.") else key
        try:
            params[name] = float(text)  # MLflow keeps str(float): its repr, exact
        except ValueError:
            params[name] = text
    return params


class _Recorder:
    """Stands in for an Optuna trial in the space's define-by-run function: records the
    distribution of each parameter asked for, answering with the past trial's value."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.distributions: dict[str, Any] = {}

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> Any:
        from optuna.distributions import FloatDistribution

        self.distributions[name] = FloatDistribution(low, high, log=log)
        return self.params.get(name)

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        from optuna.distributions import CategoricalDistribution

        self.distributions[name] = CategoricalDistribution(choices)
        return self.params.get(name)


def _distributions(params: dict[str, Any], space: SearchSpace) -> dict[str, Any] | str:
    """The distributions :class:`SpaceSampler` gives a trial of ``params``' schedule (exactly what
    the new study's own trials get: Optuna refuses two categorical distributions of one name)."""
    schedule = params.get("schedule")
    if schedule not in space.schedules:
        return f"schedule {schedule!r} not in this space"
    recorder = _Recorder(params)
    SpaceSampler(space)(recorder)
    return recorder.distributions


def _inside(dist: Any, value: Any) -> Any:
    """``value`` as ``dist`` holds it (a categorical's own choice), or ``None`` if outside."""
    from optuna.distributions import CategoricalDistribution

    if value is None:
        return None
    if isinstance(dist, CategoricalDistribution):
        return next((c for c in dist.choices if c == value), None)
    if isinstance(value, str) or not dist.low <= value <= dist.high:
        return None
    return value


def write_report(report: dict[str, Any], out: Path) -> Path:
    """``warm_start.json`` next to the results (a resumed search's summary reads it back)."""
    path = out / REPORT_FILE
    path.write_text(json.dumps(report, indent=1))
    return path


def saved_report(out: Path | None) -> dict[str, Any] | None:
    """The report a search saved when it was seeded (``None``: it was not)."""
    path = out / REPORT_FILE if out is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None
