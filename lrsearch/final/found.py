"""What a final run trains: the search read back as a typed record, and its candidates.

A search comes as a :class:`~lrsearch.output.results.SearchResult`, an MLflow run id, an
experiment's latest search, or a config given directly (:func:`given_config`); each becomes one
:class:`FoundSearch`. Its completed trials, ranked, give the :class:`Candidate` configs, each at the
multiples of its ``max_lr`` that ``--lr-scales`` asks for (:func:`resolve_scales`, :func:`scaled`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lrsearch.errors import ConfigError, SearchError
from lrsearch.infra.tracking.final import read_search
from lrsearch.job.space import SearchSpace, SpaceSampler, schedule_params
from lrsearch.output.results import BestConfig, SearchResult, TrialState, ranked_completed

__all__ = ["AUTO_SCALES", "BRIDGE_AT", "HALVE_AT", "Candidate", "FoundSearch", "FoundTrial", "candidates", "check_options",
           "given_config", "range_test_found", "read_found", "resolve_scales", "scaled"]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class FoundTrial:
    """One trial of a search read back: its config (Optuna's nested form) and last value."""

    trial_id: str
    state: str
    config: dict[str, Any]
    final_metric: float | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> FoundTrial:
        """From a row of ``trials.parquet`` (its config a JSON string) or a dict of these fields."""
        config = row.get("config")
        config = json.loads(config) if isinstance(config, str) else dict(config or {})
        return cls(str(row["trial_id"]), str(row.get("state")), config, row.get("final_metric"))


@dataclass(frozen=True)
class FoundSearch:
    """A search as a final run reads it back.

    Attributes:
        run_id, experiment_id: its MLflow parent run (``None``: an untracked result, or a config given
            without a search).
        best: its best config, as ``BestConfig.to_dict()`` writes it (``search_horizon``, ``train``...).
        trials: its trials (completed ones ranked first for an in-memory result).
        mode: the objective's direction (``None`` when unknown: inferred from the values).
    """

    run_id: str | None
    experiment_id: str | None
    best: dict[str, Any]
    trials: tuple[FoundTrial, ...] = field(default_factory=tuple)
    mode: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One config to train: a completed trial of the search (``trial_id``), at a multiple of its
    ``max_lr`` when ``--lr-scales`` asks (``trial_id@0.5x``)."""

    trial_id: str
    config: dict[str, Any]
    search_value: float | None


def check_options(epochs: int | None, steps: int | None, top_k: int, register: str | None,
                  track: bool, lr_scales: Sequence[float] | str = "auto", *, range_test: bool = False,
                  searched: bool = False) -> None:
    """The final run's options, checked before anything starts: one :class:`ConfigError` naming the
    option, the value and what is allowed. ``searched``: a search (or config) was given."""
    if range_test and searched:
        raise ConfigError("--range-test: trains without a search; give it or a search (--run-id, --experiment, "
                          "--config), not both")
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
#: ``halving=None`` (auto) with ``lr_scales="auto"``: from HALVE_AT times the searched steps the
#: scaled configs are halved on the way rather than each trained the whole horizon. Halving's last
#: rung sits at a quarter of the horizon, so from 8x it lies at twice the searched steps or more,
#: where its cooldown branch sees past the search's horizon; at 4x it would sit at the searched
#: horizon and keep the search's short-horizon bias (BENCHMARKS.md, the final-run benchmark)
HALVE_AT = 8.0


def resolve_scales(lr_scales: Sequence[float] | str, total_steps: int, best: dict[str, Any], notes: list[str],
                   halving: bool | None = None) -> tuple[tuple[float, ...], bool]:
    """``lr_scales`` and ``halving``, with ``"auto"`` and ``None`` resolved against a run of
    ``total_steps`` optimizer steps. ``"auto"``: :data:`AUTO_SCALES` when that is at least
    :data:`BRIDGE_AT` times the steps the config was searched at (its ``search_horizon``), ``(1,)``
    otherwise or when that horizon is unknown (a hand-written config). ``None``: halved when the
    scales were ``"auto"`` and the run is at least :data:`HALVE_AT` times the searched steps.

    A longer run's best LR sits lower than a short trial's, so the candidates only go down; below
    4x the steps the extra runs were measured not to pay (BENCHMARKS.md, the horizon bridge).
    """
    if not isinstance(lr_scales, str):
        return tuple(float(x) for x in lr_scales), bool(halving)
    searched = (best.get("search_horizon") or {}).get("total_steps")
    if not searched or total_steps < BRIDGE_AT * searched:
        return (1.0,), bool(halving)
    if halving is None:
        halving = total_steps >= HALVE_AT * searched
    how = ("they start together and a cooldown branch at a quarter of the run keeps the best"
           if halving else "validation keeps the best")
    notes.append(f"lr_scales auto: {total_steps} steps is {total_steps / searched:.1f}x "
                 f"the {searched} the config was searched at, so each config trains at "
                 f"{', '.join(f'{x:g}x' for x in AUTO_SCALES)} its max_lr and {how} (--lr-scales 1: one run)")
    return AUTO_SCALES, halving


def scaled(found: list[Candidate], lr_scales: Sequence[float]) -> list[Candidate]:
    """Each candidate at each multiple of its ``max_lr``, in order (``1``: the config as found).

    ``--lr-scales 1,0.5,0.25`` lets the final run's validation decide how far to carry a short
    trial's LR down to a longer horizon (BENCHMARKS.md, the final-run benchmark).
    """
    return [Candidate(c.trial_id if x == 1 else f"{c.trial_id}@{x:g}x",
                      {**c.config, "max_lr": c.config["max_lr"] * x}, c.search_value)
            for c in found for x in lr_scales]


def read_found(search: SearchResult | BestConfig | Mapping[str, Any] | str | None, uri: str, experiment: str,
               track: bool) -> FoundSearch:
    """The search to train from: a result in memory, a config, an MLflow run id, an experiment's
    latest search, or (``None``) the job's own experiment's."""
    if isinstance(search, SearchResult):
        if search.best is None:
            raise SearchError("search: it has no completed trial: nothing to train (every trial was "
                              "pruned, diverged or failed)")
        tracking = search.tracking or {}
        trials = tuple(FoundTrial(t.trial_id, t.state.value, t.config, t.final_metric)
                       for t in ranked_completed(search.trials, search.mode))
        return FoundSearch(tracking.get("run_id"), tracking.get("experiment_id"), search.best.to_dict(), trials,
                           search.mode)
    if isinstance(search, BestConfig | Mapping):
        return given_config(search)
    if search is not None and not isinstance(search, str):
        raise ConfigError(f"search: got {type(search).__name__}; allowed: a SearchResult, a config "
                          "({max_lr, schedule, params}), an MLflow run id, an experiment name, or None "
                          "(the job's latest search)")
    if not track and search is None:
        raise ConfigError("search: without MLflow (track=False) give the SearchResult to train")

    if search is not None and _RUN_ID.match(search):
        found = read_search(uri, run_id=search)
    else:
        found = read_search(uri, experiment=search or experiment)
    return FoundSearch(found["run_id"], found["experiment_id"], found["best"],
                       tuple(FoundTrial.of(row) for row in found["trials"]), found["mode"])


def given_config(given: BestConfig | Mapping[str, Any]) -> FoundSearch:
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
    return FoundSearch(None, None, best, (FoundTrial("config", TrialState.COMPLETED.value, config),))


def range_test_found(space: SearchSpace) -> FoundSearch:
    """``--range-test``'s one config, before its range test: the space's default schedule at the
    middle of its ranges (its first trial's). Its ``max_lr``, the prior's geometric middle, holds
    the place of the range test's LR until the test runs where the model trains."""
    prior = space.max_lr_prior
    point = SpaceSampler(space).first_point(math.sqrt(prior.low * prior.high))
    name = point["schedule"]
    config: dict[str, Any] = {"max_lr": point["max_lr"], "schedule": name,
                              name: {k.split("/", 1)[1]: v for k, v in point.items() if k.startswith(f"{name}/")}}
    config.update({k: point[k] for k in ("weight_decay", "layer_decay") if k in point})
    best = {"trial_id": "range_test", "schedule": name, "max_lr": config["max_lr"], "params": dict(config[name]),
            "search_config": config, "value": None, "train": {}, "search_horizon": None}
    return FoundSearch(None, None, best, (FoundTrial("range_test", TrialState.COMPLETED.value, config),))


def candidates(found: FoundSearch, top_k: int) -> list[Candidate]:
    """The ``top_k`` best completed trials' configs, the search's best first."""
    best = found.best
    mode = found.mode or _infer_mode(found)
    done = [t for t in found.trials if t.state == TrialState.COMPLETED.value
            and (t.final_metric is not None or t.trial_id == best["trial_id"])]
    done.sort(key=lambda t: t.final_metric, reverse=mode == "max")
    # the best config first, whatever the table's order of ties
    first = [t for t in done if t.trial_id == best["trial_id"]]
    rest = [t for t in done if t.trial_id != best["trial_id"]]
    rows = (first + rest)[:top_k]
    if not rows:  # a search logged without its trial table: its best config alone
        rows = [FoundTrial(best["trial_id"], TrialState.COMPLETED.value, best.get("search_config") or {},
                           best.get("value"))]
    out = []
    for row in rows:
        if "max_lr" not in row.config or "schedule" not in row.config:
            raise SearchError(f"search: trial {row.trial_id} has no config to train (max_lr, "
                              "schedule); was it logged by this version of lrsearch?")
        out.append(Candidate(row.trial_id, dict(row.config), row.final_metric))
    return out


def _infer_mode(found: FoundSearch) -> str:
    values = [t.final_metric for t in found.trials if t.final_metric is not None]
    best = found.best.get("value")
    return "min" if values and best is not None and best == min(values) and best != max(values) else "max"
