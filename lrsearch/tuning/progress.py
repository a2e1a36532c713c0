"""The search's live status line on the terminal (instead of Ray Tune's tables). Display only."""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback


class LiveProgress(Callback):
    """One live status line: trials running/done and the best epoch so far."""

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
