"""A search's first steps: its results directory, MLflow parent run, range test and first trials.

Each step continues whatever an earlier, interrupted run of the same search left: a saved range
test is reused and the same MLflow parent run continues, whatever moment the driver was killed at.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrsearch.console import RangeTestProgress, err
from lrsearch.errors import SearchError
from lrsearch.infra.tracking import SearchTracker, resolve_tracking
from lrsearch.job.config import TrackingConfig
from lrsearch.job.space import SearchSpace, SpaceSampler
from lrsearch.range_test import RangeTestResult
from lrsearch.range_test.finder import local_dir, save_range_test
from lrsearch.tasks import Task
from lrsearch.tuning.tuner import tune_state_exists


def prepare_dir(name: str, root: str, resume: bool, show: bool) -> tuple[Path | None, bool, list[str]]:
    """Check what ``root`` (the results of the search ``name``) holds against ``resume``.

    Returns:
        The local results directory (``None`` on remote storage), whether Ray Tune's state is
        there to restore, and notes for the user.

    Raises:
        SearchError: results exist and ``resume`` is False.
    """
    out = Path(root) if "://" not in root else None
    exists = tune_state_exists(root)
    if exists and not resume:
        raise SearchError(f"a search named {name!r} already has results in {root}; "
                          f"continue it with --resume, or change 'name' / delete that directory")
    notes = []
    if resume and not exists:
        kept = [n for n in ("range_test.json", "mlflow.json") if out is not None and (out / n).is_file()]
        notes.append(f"--resume: no trial of {name!r} had been saved in {root}; starting the trials "
                     f"from the beginning" + (f" (continuing its {' and '.join(kept)})" if kept else ""))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if not exists and (out / "optuna.db").is_file():
            (out / "optuna.db").unlink()  # a study whose trials Ray Tune never recorded
    for note in notes:
        warn(note, show)
    return out, exists and resume, notes


def warn(note: str, show: bool) -> str:
    """``note``, printed to stderr first when ``show``."""
    if show:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    return note


def start_tracker(tracking: TrackingConfig, name: str, root: str, resume: bool) -> SearchTracker:
    """The MLflow parent run of the search ``name`` (``tracking``: the job's section): created, or
    continued on ``resume``. An unreachable tracking store fails here, before any training starts."""
    uri, experiment = resolve_tracking(tracking.uri, tracking.experiment, name)
    return SearchTracker.start(uri=uri, experiment=experiment, job_name=name, results_dir=root,
                               resume=resume, flush_timeout_s=tracking.flush_timeout_s)


def range_test_data(measure: Callable[..., tuple[Task, RangeTestResult]] | None, out: Path | None, resume: bool,
                    show: bool, root: str, name: str) -> dict | None:
    """The range test's data: the saved one when resuming, else a new run of ``measure`` (the range
    test's driver on the job, taking ``progress=``; ``None``: no range test), saved next to the
    results of the search ``name`` under ``root``."""
    if measure is None:
        return None
    saved = out / "range_test.json" if out else None
    if resume and saved is not None and saved.is_file():
        return json.loads(saved.read_text())

    # its length (range_test.num_steps: auto) is known once it starts: the bar learns it
    with RangeTestProgress(100, enabled=show) as bar:
        task, result = measure(progress=bar.callback)
    return save_range_test(local_dir(root, name), name, task.name, result)["range_test"]


def first_points(start_points: list[dict[str, Any]], space: SearchSpace,
                 range_test: dict | None) -> list[dict[str, Any]]:
    """The trials run before the searcher's own: ``start_points`` (the job's ``search.start_points``), then the range
    test's consensus suggestion (their geometric mean / 3, clipped into the space) with the space's
    default schedule, and with the ``schedule_free`` arm where the space has one."""
    points = [_optuna_names(p) for p in start_points]
    if range_test:
        s = [v for v in range_test["suggestions"].values() if v]
        low, high = space.max_lr_prior.low, space.max_lr_prior.high
        guess = math.exp(sum(math.log(v) for v in s) / len(s)) / 3 if s else math.sqrt(low * high)
        lr = min(max(guess, low), high)
        points.append(SpaceSampler(space).first_point(lr))
        if "schedule_free" in space.schedules and space.default_schedule != "schedule_free":
            # the schedule-free arm's own start: the same LR, its warmup at the middle of its range
            points.append(SpaceSampler(space).first_point(lr, schedule="schedule_free"))
    return points


def _optuna_names(point: dict[str, Any]) -> dict[str, Any]:
    """``{max_lr, schedule, warmup_frac}`` -> Optuna's names ``{max_lr, schedule, linear/warmup_frac}``."""
    top = {"max_lr", "schedule", "weight_decay", "layer_decay"}
    name = point["schedule"]
    return {k if k in top else f"{name}/{k}": v for k, v in point.items()}
