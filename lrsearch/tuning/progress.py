"""The search's live status line on the terminal (instead of Ray Tune's tables), and its progress
published at each trial's end: a ``lrsearch-progress {json}`` line on stderr inside a Ray job
(``lrsearch jobs status`` reads the last one from the job's logs) and metrics on the MLflow parent."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from ray.tune import Callback

from lrsearch.console import err
from lrsearch.infra.jobs import PROGRESS_PREFIX, progress_text
from lrsearch.tuning.budget import Ledger
from lrsearch.tuning.track import log_progress


class LiveProgress(Callback):
    """One live status line: trials running/done, the best epoch so far, the budget spent and the
    forecast end."""

    def __init__(self, ledger: Ledger, enabled: bool, *, tracker: Any = None, print_line: bool = False) -> None:
        self.ledger, self.enabled, self.tracker, self.print_line = ledger, enabled, tracker, print_line
        self.metric, self.mode = ledger.metric, ledger.mode
        self.running: set[str] = set()
        self.best: float | None = None
        self._status = None

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles callbacks with the experiment state; the live terminal widget and the MLflow
        # client stay here.
        return {**self.__dict__, "_status": None, "tracker": None}

    def _show(self) -> None:
        if not self.enabled:
            return
        if self._status is None:
            self._status = err.status("")
            self._status.start()
        self._status.update(progress_text(self.ledger.snapshot(), best=("best epoch so far", self.best)))

    def _publish(self) -> None:
        snapshot = self.ledger.snapshot()
        if self.print_line:
            sys.stderr.write(PROGRESS_PREFIX + json.dumps(snapshot) + "\n")
            sys.stderr.flush()
        if self.tracker is not None:
            log_progress(self.tracker, snapshot)

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
        self._publish()
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)

    def on_experiment_end(self, trials, **info):
        if self._status is not None:
            self._status.stop()
            self._status = None
