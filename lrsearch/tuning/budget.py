"""The search's budget (``search.budget``) and its ledger: what has been spent, what is left, when
the search will end.

Units: trial-epochs (epochs trained, all trials together), GPU-hours (each trial's
``resources.gpu`` x its seconds) or wall seconds (the search's time in Ray Tune, across resumes).

The rule, kept by :class:`BudgetedSearch` (which trials start) and :class:`BudgetScheduler`
(which trials train on):

- A trial starts only when the budget left pays for its first rung (``grace_period`` epochs with
  ASHA, ``max_epochs`` without), after setting aside what the running trials are promised: each
  the rest of its first rung, or the one epoch it is training past it.
- Past its first rung a trial trains another epoch only when the budget left pays for it; else it
  stops there (a partial trial: PRUNED). So trial-epochs never exceed the budget.
- In GPU-hours and wall seconds an epoch's cost is forecast from the mean measured seconds per
  epoch; until one epoch has been measured, one trial runs at a time. Past the wall-time deadline
  every trial stops at its next epoch's end (``search.time_budget_s`` is this budget).
- The search ends when nothing runs and nothing more can be paid for. ``--resume`` with a larger
  budget goes on: the spent totals are saved with Tune's searcher state, the limit is the job's.

Why a scheduler and not a ``tune.Stopper``: Tune saves the stopper inside its experiment state and
a resume gets that copy back (with the old budget); the searcher and the scheduler a resume takes
from the ``Tuner``, where this run's ledger is put.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

__all__ = ["BudgetScheduler", "BudgetedSearch", "Ledger"]

#: :meth:`Ledger.can_start` answers
START, WAIT, FINISHED = "start", "wait", "finished"


class Ledger:
    """What a search has spent and done so far, and the budget's decisions (driver side, O(1) per
    result; its state holds only the running trials)."""

    def __init__(self, budget: tuple[str, float] | None, *, min_epochs: int, max_epochs: int, gpu: float,
                 num_trials: int, metric: str, mode: str, clock: Any = time.monotonic) -> None:
        self.kind, self.limit = budget if budget else (None, None)
        self.min_epochs, self.max_epochs, self.gpu = min_epochs, max_epochs, gpu
        self.num_trials, self.metric, self.mode = num_trials, metric, mode
        self.epochs = 0  # trial-epochs trained, each counted once (a resumed trial's replays are not)
        self.epoch_seconds = 0.0  # their seconds
        self.done = 0  # trials ended (any state)
        self.best: float | None = None  # best final value of a trial that trained max_epochs
        self.running: dict[str, int] = {}  # trial id -> epochs it has reported (created, not ended)
        self.exhausted = False  # the budget refused a trial or an epoch
        self._before = 0.0  # seconds in Tune of the runs before this one (resume)
        self._t0: float | None = None
        self._clock = clock

    @classmethod
    def for_search(cls, search: Any, *, gpu: float, metric: str, mode: str) -> Ledger:
        """The ledger of a job's ``search`` section (a :class:`~lrsearch.job.config.SearchConfig`)."""
        first_rung = search.grace_period if search.early_stopping == "asha" else search.max_epochs
        return cls(search.budget_limit(), min_epochs=first_rung, max_epochs=search.max_epochs, gpu=gpu,
                   num_trials=search.num_trials, metric=metric, mode=mode)

    # ---- totals ------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self._before + (self._clock() - self._t0 if self._t0 is not None else 0.0)

    def gpu_hours(self) -> float:
        return self.gpu * self.epoch_seconds / 3600

    def spent(self) -> float | None:
        """In the budget's unit; ``None`` without a budget."""
        return {"trial_epochs": self.epochs, "gpu_hours": self.gpu_hours(), "wall_s": self.elapsed(),
                None: None}[self.kind]

    def _epoch_cost(self) -> float | None:
        """One more epoch's forecast cost in the budget's unit (``None``: nothing measured yet)."""
        if self.kind == "trial_epochs":
            return 1.0
        if not self.epochs:
            return None
        seconds = self.epoch_seconds / self.epochs
        return self.gpu * seconds / 3600 if self.kind == "gpu_hours" else seconds

    def _left(self, cost: float, exclude: str | None = None) -> float:
        """The budget left after what the running trials (but ``exclude``) are promised."""
        promised = 0.0
        if self.kind != "wall_s":  # trials running side by side share wall time; they add up in the others
            promised = cost * sum(max(self.min_epochs - n, 1) for t, n in self.running.items() if t != exclude)
        return self.limit - self.spent() - promised

    # ---- decisions ---------------------------------------------------------------------------

    def can_start(self) -> str:
        """``START`` a trial, ``WAIT`` for a running one to end, or the search is ``FINISHED``."""
        if self._t0 is None:
            self._t0 = self._clock()  # the clock runs from Tune's first request for a trial
        if self.limit is None:
            return START
        cost = self._epoch_cost()
        if cost is None and self.running:
            return WAIT  # nothing measured yet: one trial at a time until an epoch is
        left = self._left(cost or 0.0)
        if left > 0 and left >= self.min_epochs * (cost or 0.0):
            return START
        if self.running:
            return WAIT
        self.exhausted = True
        return FINISHED

    def may_continue(self, trial_id: str) -> bool:
        """Whether the trial, having just reported, may train another epoch."""
        done = self.running.get(trial_id, 0)
        if self.limit is None or done >= self.max_epochs:
            return True  # no budget, or the trial ends anyway
        cost = self._epoch_cost() or 0.0
        if self.kind == "wall_s" and self.elapsed() >= self.limit:
            pass  # the deadline: even a promised epoch stops
        elif done < self.min_epochs or self._left(cost, exclude=trial_id) >= cost:
            return True
        self.exhausted = True
        return False

    # ---- events ------------------------------------------------------------------------------

    def started(self, trial_id: str) -> None:
        self.running[trial_id] = 0

    def record(self, trial_id: str, result: dict[str, Any]) -> None:
        """Count the epochs a result reports for the first time."""
        epoch = int(result.get("training_iteration") or 0)
        seen = self.running.get(trial_id)
        new = (1 if epoch else 0) if seen is None else max(0, epoch - seen)  # None: restarted by Tune
        self.running[trial_id] = max(epoch, seen or 0)
        if new:
            self.epochs += new
            self.epoch_seconds += float(result.get("time_this_iter_s") or 0.0)

    def ended(self, trial_id: str, result: dict[str, Any] | None) -> None:
        self.running.pop(trial_id, None)
        self.done += 1
        value = (result or {}).get(self.metric)
        full = (result or {}).get("training_iteration", 0) >= self.max_epochs and not (result or {}).get("diverged")
        if full and isinstance(value, int | float) and math.isfinite(value):
            self._better(value)

    def _better(self, value: float) -> None:
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = float(value)

    # ---- what others read ----------------------------------------------------------------------

    def snapshot(self, finished: bool = False) -> dict[str, Any]:
        """Spent, remaining and the forecast end: what the status line, ``--json``, ``lrsearch jobs``
        and the MLflow parent run show."""
        budget = None
        if self.kind is not None:
            spent = self.spent()
            cost = self._epoch_cost()
            # exhausted: the budget refused something, or what is left cannot pay another trial
            spent_out = cost is not None and self.limit - spent < max(self.min_epochs * cost, 1e-12)
            budget = {"kind": self.kind, "limit": self.limit, "spent": round(spent, 6),
                      "remaining": round(max(0.0, self.limit - spent), 6),
                      "exhausted": self.exhausted or spent_out}
        eta = 0.0 if finished else self._eta()
        end = None if eta is None else datetime.now(timezone.utc) + timedelta(seconds=eta)
        return {"finished": finished, "trials_done": self.done, "num_trials": self.num_trials,
                "running": len(self.running), "metric": self.metric, "best": self.best,
                "trial_epochs": self.epochs, "gpu_hours": round(self.gpu_hours(), 6),
                "elapsed_s": round(self.elapsed(), 1), "budget": budget,
                "forecast_end": end.isoformat(timespec="seconds") if end else None}

    def _eta(self) -> float | None:
        """Seconds to the end, from the rate so far: of trials (to ``num_trials``) and of the
        budget's spending, whichever ends first."""
        elapsed, etas = self.elapsed(), []
        if self.done and elapsed > 0:
            etas.append(max(0, self.num_trials - self.done) * elapsed / self.done)
        if self.kind == "wall_s":
            etas.append(max(0.0, self.limit - elapsed))
        elif self.kind is not None and self.spent() > 0 and elapsed > 0:
            etas.append(max(0.0, self.limit - self.spent()) * elapsed / self.spent())
        return min(etas) if etas else None

    def state(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "epoch_seconds": self.epoch_seconds, "done": self.done, "best": self.best,
                "running": dict(self.running), "elapsed_s": self.elapsed(), "exhausted": self.exhausted}

    def load(self, state: dict[str, Any] | None) -> None:
        """The totals an earlier run of the search saved (the limit stays this run's)."""
        if not state:
            return
        self.epochs, self.epoch_seconds, self.done = state["epochs"], state["epoch_seconds"], state["done"]
        self.best, self.running, self._before = state["best"], dict(state["running"]), state["elapsed_s"]

    def add_lost(self, work: list[dict[str, Any]]) -> None:
        """Count the trials a killed driver ran after Tune's last saved state (that state, loaded,
        lacks them; the study has them): their epochs and seconds are spent, the ended ones are done.
        A trial's seconds not kept are forecast from the mean epoch so far."""
        for w in work:
            mean = self.epoch_seconds / self.epochs if self.epochs else 0.0
            self.epochs += w["epochs"]
            self.epoch_seconds += w["seconds"] if w["seconds"] is not None else mean * w["epochs"]
            self.done += 1 if w["ended"] else 0
            if w["value"] is not None:
                self._better(w["value"])


class BudgetScheduler(TrialScheduler):
    """Tune's scheduler (ASHA or FIFO) with the budget's say: each result's epochs are counted, and
    a trial whose next epoch the budget cannot pay stops there."""

    def __init__(self, scheduler: TrialScheduler, ledger: Ledger) -> None:
        super().__init__()
        self.scheduler, self.ledger = scheduler, ledger

    @property
    def metric(self) -> str | None:
        return self.scheduler.metric

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return self.scheduler.set_search_properties(metric, mode, **spec)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self.ledger.record(trial.trial_id, result)
        decision = self.scheduler.on_trial_result(tune_controller, trial, result)
        if decision == self.CONTINUE and not self.ledger.may_continue(trial.trial_id):
            return self.STOP
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.ledger.record(trial.trial_id, result)  # a trial's last epoch reaches only this
        self.scheduler.on_trial_complete(tune_controller, trial, result)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.scheduler.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.scheduler.on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.scheduler.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        return self.scheduler.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return self.scheduler.debug_string()


class BudgetedSearch(SearchGenerator):
    """Tune's ``SearchGenerator`` that asks the ledger before creating a trial, and saves the
    ledger's totals with its own state."""

    def __init__(self, searcher: Any, ledger: Ledger, *, max_concurrent: int) -> None:
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))
        self.ledger = ledger

    def create_trial_if_possible(self, experiment_spec: dict) -> Any:
        decision = self.ledger.can_start()
        if decision == FINISHED:
            self.set_finished()
        if decision != START:
            return None
        trial = super().create_trial_if_possible(experiment_spec)
        if trial is not None:
            self.ledger.started(trial.trial_id)
        return trial

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result=result, error=error)
        self.ledger.ended(trial_id, result)

    def get_state(self) -> dict:
        return {**super().get_state(), "ledger": self.ledger.state()}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        self.ledger.load(state.pop("ledger", None))
        # restore_from_dir restored the searcher first: it knows what ran after Tune's saved state
        self.ledger.add_lost(getattr(self.searcher.searcher, "lost_work", []))
        # whatever ended the run before (a spent budget, a deadline), the job's budget decides now
        super().set_state({**state, "finished": False})
