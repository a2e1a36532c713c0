"""Typed search results: one record per trial, the best config, and the files they are written to.

Records are built once from Ray Tune's result grid and stay Python objects for the rest of the
process; JSON and Parquet appear only at the file edge (:func:`write_trial_table`,
:func:`write_best_config`, :func:`write_summary`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from lrsearch.job.space import schedule_params

__all__ = ["BestConfig", "SearchResult", "TrialRecord", "TrialState", "best_config", "ranked_completed",
           "trial_records"]


class TrialState(str, Enum):
    """How a trial ended."""

    COMPLETED = "completed"  #: trained its full budget
    PRUNED = "pruned"  #: stopped early by the scheduler (ASHA)
    DIVERGED = "diverged"  #: NaN or exploding loss; stopped at once
    ERRORED = "errored"  #: raised an exception (after Ray Tune's retries)


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search."""

    trial_id: str
    #: the order Ray Tune created the trial in (1, 2, ...): the searcher's order of suggestions
    number: int
    schedule: str | None
    max_lr: float | None
    #: the trial's config as sampled: ``{"max_lr", "schedule", <schedule>: {params}, ...}``
    config: dict[str, Any]
    #: the schedule's parameters resolved in steps for the search's horizon
    schedule_params: dict[str, Any]
    state: TrialState
    stopped_at_epoch: int
    metric_per_epoch: list[float]
    train_loss_per_epoch: list[float]
    #: what ``search.rung_metric: val_loss`` ranks by (1e9 for an epoch that diverged)
    val_loss_per_epoch: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    node_id: str | None = None
    error: str | None = None
    path: str = ""
    weight_decay: float | None = None
    layer_decay: float | None = None
    #: bytes of checkpoints this trial wrote (its ``search.checkpoint`` policy's cost on storage)
    checkpoint_bytes: int = 0

    @property
    def final_metric(self) -> float | None:
        return self.metric_per_epoch[-1] if self.metric_per_epoch else None

    @property
    def params(self) -> dict[str, Any]:
        """The schedule's own sampled parameters, horizon-free (fractions of the run)."""
        return dict(self.config.get(self.schedule) or {}) if self.schedule else {}

    def row(self) -> dict[str, Any]:
        """The trial table's row (nested configs as JSON strings: Parquet's edge)."""
        row = asdict(self)
        row["state"] = self.state.value
        row["config"] = json.dumps(self.config, sort_keys=True, default=str)
        row["schedule_params"] = json.dumps(self.schedule_params, sort_keys=True)
        row["final_metric"] = self.final_metric
        return row


@dataclass(frozen=True)
class BestConfig:
    """The best completed trial's LR strategy, horizon-free, with the search's horizon labelled."""

    schedule: str
    max_lr: float
    #: the schedule's parameters as searched: fractions of the run (``warmup_frac``, ``T_0_frac``...)
    params: dict[str, Any]
    optimizer: dict[str, Any]
    layer_decay: float | None
    metric: str
    value: float
    trial_id: str
    #: what the search trained: ``epochs``, ``steps_per_epoch``, ``total_steps`` and the
    #: ``schedule_params`` resolved in steps for them (not the user's horizon)
    search_horizon: dict[str, Any]
    search_config: dict[str, Any] = field(default_factory=dict)
    #: the training recipe the trials used (``max_grad_norm``, ``precision``,
    #: ``gradient_accumulation_steps``): the export carries it, a final run trains with it
    train: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler_params(self, total_steps: int) -> dict[str, Any]:
        """The schedule's parameters resolved for a run of ``total_steps`` optimizer steps."""
        return schedule_params({"schedule": self.schedule, self.schedule: self.params}, total_steps)


@dataclass
class SearchResult:
    """What a finished search produced.

    Attributes:
        best: the best completed trial's config, or ``None`` if no trial completed.
        trials: every trial, in the order Ray Tune lists them.
        metric, mode: the objective (``val_accuracy``, ``max``).
        range_test: the range test's data (``suggestions``, ``bounds``, ``lrs``...), if one ran.
        steps_per_epoch: optimizer steps in one trial epoch.
        paths: where the files are (``results``, ``trials``, ``best_config``, ``summary``...).
        importances: each searched parameter's importance (Optuna's evaluator), summing to 1.
        seconds: wall time of the whole search.
        tracking: MLflow ``uri``, ``experiment_id``, ``run_id`` of the parent run.
    """

    best: BestConfig | None
    trials: list[TrialRecord]
    metric: str
    mode: str
    range_test: dict[str, Any] | None
    steps_per_epoch: int
    paths: dict[str, str] = field(default_factory=dict)
    importances: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    tracking: dict[str, str] | None = None
    experiment: str | None = None
    #: what the search told the user on the way (e.g. that a resume found nothing to continue)
    notes: list[str] = field(default_factory=list)
    #: ``search.warm_start``'s report: trials ``reused`` and ``dropped``, per earlier search
    #: (``sources``: ``ref``, ``run_id``, counts by state, ``dropped`` by reason); ``None``: off
    warm_start: dict[str, Any] | None = None
    #: the budget and progress at the end (:meth:`~lrsearch.tuning.budget.Ledger.snapshot`):
    #: ``trials_done``, ``trial_epochs``, ``gpu_hours``, ``budget`` (``kind``, ``limit``, ``spent``,
    #: ``remaining``, ``exhausted``; ``None`` without one) and ``forecast_end``
    progress: dict[str, Any] | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = {s.value: sum(1 for t in self.trials if t.state is s) for s in TrialState}
        counts["total"] = len(self.trials)
        return counts

    @property
    def best_metric(self) -> float | None:
        return None if self.best is None else self.best.value

    @property
    def trial_epochs(self) -> int:
        """Epochs trained by all trials together (the search's compute, range test aside)."""
        return sum(t.stopped_at_epoch for t in self.trials)

    @property
    def range_test_epochs(self) -> float:
        """The range test's optimizer steps, in trial epochs."""
        steps = len(self.range_test["lrs"]) if self.range_test else 0
        return steps / max(1, self.steps_per_epoch)

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (what ``--json`` prints and ``summary.json`` holds)."""
        return {
            "best_config": self.best.to_dict() if self.best else None,
            "best_metric": self.best_metric,
            "metric": self.metric,
            "mode": self.mode,
            "counts": self.counts,
            "compute": {"trial_epochs": self.trial_epochs,
                        "range_test_epochs": round(self.range_test_epochs, 3)},
            "budget": (self.progress or {}).get("budget"),
            "progress": self.progress,
            "importances": self.importances,
            "paths": self.paths,
            "bounds": self.range_test["bounds"] if self.range_test else None,
            "tracking": self.tracking,
            "warm_start": self.warm_start,
            "seconds": round(self.seconds, 1),
        }


# --------------------------------------------------------------------------------------------
# From Ray Tune's result grid
# --------------------------------------------------------------------------------------------


def _state(result: Any, max_t: int) -> tuple[TrialState, int]:
    metrics = result.metrics or {}
    epochs = int(metrics.get("training_iteration", 0) or 0)
    if result.error is not None:
        return TrialState.ERRORED, epochs
    if metrics.get("diverged"):
        return TrialState.DIVERGED, epochs
    if epochs < max_t:
        return TrialState.PRUNED, epochs
    return TrialState.COMPLETED, epochs


def error_line(error: BaseException) -> str:
    """The exception's own message: Ray's wrapper puts the remote traceback (with colours) first."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:500] if lines else type(error).__name__


def _column(df: Any, name: str) -> list[float]:
    return [] if df is None or name not in df else [float(v) for v in df[name].fillna(0).tolist()]


def trial_id_of(result: Any) -> str:
    """A Ray Tune ``Result``'s trial id (from its last result, else its directory's name)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def trial_records(grid: Any, *, metric: str, max_epochs: int, total_steps: int) -> list[TrialRecord]:
    """One :class:`TrialRecord` per trial of Ray Tune's ``ResultGrid``, in the order of creation.

    Raises:
        ValueError: a trial's config holds schedule parameters the schedule rejects (a bug: the
            space validated them), instead of exporting a best config without them.
    """
    records = []
    for result in grid:
        config = dict(result.config or {})
        state, epochs = _state(result, max_epochs)
        df = result.metrics_dataframe
        if df is not None and "training_iteration" in df:
            # a resumed trial may report again the epochs after Tune's last saved state
            df = df.drop_duplicates("training_iteration", keep="last")
        metrics = result.metrics or {}
        trial_id = trial_id_of(result)
        number = re.match(rf".*?_{re.escape(trial_id)}_(\d+)", Path(result.path).name)
        records.append(TrialRecord(
            trial_id=trial_id,
            number=int(number[1]) if number else len(records) + 1,
            schedule=config.get("schedule"),
            max_lr=config.get("max_lr"),
            config=config,
            schedule_params=schedule_params(config, total_steps) if "schedule" in config else {},
            state=state,
            stopped_at_epoch=epochs,
            metric_per_epoch=_column(df, metric),
            train_loss_per_epoch=_column(df, "train_loss"),
            val_loss_per_epoch=_column(df, "val_loss"),
            wall_seconds=float(metrics.get("time_total_s") or 0.0),
            train_seconds=sum(_column(df, "train_seconds")),
            node_id=metrics.get("node_id"),
            error=None if result.error is None else error_line(result.error),
            path=result.path,
            weight_decay=config.get("weight_decay"),
            layer_decay=config.get("layer_decay"),
            checkpoint_bytes=int(sum(_column(df, "checkpoint_bytes"))),
        ))
    return sorted(records, key=lambda t: t.number)


def ranked_completed(trials: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """The trials that completed their full budget, best first (pruned trials' values are partial)."""
    finished = [t for t in trials if t.state is TrialState.COMPLETED and t.final_metric is not None]
    return sorted(finished, key=lambda t: t.final_metric, reverse=mode == "max")


def trained_optimizer(optimizer: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The job's optimizer as a trial config trains it: its searched weight decay, and the
    ``schedule_free`` arm's AdamWScheduleFree (``lrsearch.optim.optimizers.for_schedule``)."""
    if config.get("weight_decay") is not None:
        optimizer = {**optimizer, "weight_decay": config["weight_decay"]}
    if config.get("schedule") == "schedule_free":
        optimizer = {**optimizer, "name": "adamw_schedulefree"}
    return optimizer


def best_config(trials: list[TrialRecord], *, mode: str, metric: str, optimizer: dict[str, Any],
                epochs: int, steps_per_epoch: int, total_steps: int,
                train: dict[str, Any] | None = None) -> BestConfig | None:
    """The best trial that completed its full budget (pruned trials' values are partial)."""
    finished = ranked_completed(trials, mode)
    if not finished:
        return None
    best = finished[0]
    return BestConfig(
        schedule=best.schedule, max_lr=best.max_lr, params=best.params,
        optimizer=trained_optimizer(optimizer, best.config),
        layer_decay=best.layer_decay, metric=metric, value=best.final_metric, trial_id=best.trial_id,
        search_horizon={"epochs": epochs, "steps_per_epoch": steps_per_epoch,
                        "total_steps": total_steps,
                        "schedule_params": best.schedule_params},
        search_config=best.config,
        train=dict(train or {}),
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_trial_table(trials: list[TrialRecord], out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / "trials.parquet"
    pq.write_table(pa.Table.from_pylist([t.row() for t in trials]), path)
    return path


def write_best_config(best: BestConfig, out: Path) -> Path:
    path = out / "best_config.yaml"
    path.write_text(yaml.safe_dump(best.to_dict(), sort_keys=False))
    return path


def write_study(study_trials: list[dict[str, Any]], out: Path) -> Path:
    path = out / "optuna_trials.json"
    path.write_text(json.dumps(study_trials, indent=1, default=str))
    return path


def write_summary(result: SearchResult, out: Path) -> Path:
    path = out / "summary.json"
    path.write_text(json.dumps(result.summary(), indent=1, default=str))
    return path
