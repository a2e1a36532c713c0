"""The Optuna side of the search: a searcher that tells Optuna the truth about pruned trials.

Ray's ``OptunaSearch`` reports a trial that ASHA stopped early as COMPLETE with its partial value,
so TPE would learn from truncated runs as if they had finished. :class:`PrunedAwareOptunaSearch`
tells such trials, and diverged ones, as PRUNED (their per-epoch values are already reported as
intermediate values). Per-trial work is O(1): no copy of the study, no file written per trial.
"""

from __future__ import annotations

import json
import time
from typing import Any

from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from lrsearch.tuning.tpe_window import WindowedSampler

__all__ = ["PrunedAwareOptunaSearch", "make_sampler", "study_storage"]

_INIT_ATTEMPTS = 5
#: the study's user attribute counting the trials seeded into it by ``search.warm_start``
WARM_START_ATTR = "lrsearch.warm_start_trials"

#: each Optuna trial's user attribute naming its Ray Tune trial (this search's own trials carry it)
TUNE_ID_ATTR = "lrsearch.tune_trial_id"

#: each finished trial's user attribute holding its config and per-epoch record (:func:`tune_record`)
RECORD_ATTR = "lrsearch.record"
#: the result keys kept per epoch in that record: what the trial table reads
_RECORD_KEYS = ("training_iteration", "time_total_s", "train_loss", "val_loss", "train_seconds",
                "checkpoint_bytes", "diverged", "node_id", "trial_id")

#: ``search.algorithm`` -> a function building the Optuna sampler
ALGORITHMS = ("tpe", "random")


def make_sampler(algorithm: str, *, seed: int, num_trials: int) -> Any:
    """The Optuna sampler for ``search.algorithm`` (``tpe`` or ``random``), seeded."""
    from optuna.samplers import RandomSampler, TPESampler

    if algorithm == "random":
        return RandomSampler(seed=seed)
    if algorithm == "tpe":
        # a few random trials first (TPE needs data), at most half the budget on small searches;
        # past 256 trials, TPE sees the newest and the best (a flat cost per trial)
        return WindowedSampler(TPESampler(seed=seed, n_startup_trials=max(1, min(5, num_trials // 2))))
    raise ValueError(f"search.algorithm: got {algorithm!r}; allowed: {', '.join(ALGORITHMS)}")


def study_storage(path: str | None) -> Any:
    """An Optuna RDB storage in the SQLite file ``path`` (``None``: in memory).

    The study then lives in a file Optuna's own tools open (``optuna-dashboard sqlite:///PATH``),
    and the searcher's saved state is a reference to it rather than a copy of every trial.
    """
    if path is None:
        return None
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    # Writers wait up to a minute for a reader's lock (a dashboard open on the file) instead of
    # failing a trial with "database is locked".
    url, engine_kwargs = f"sqlite:///{path}", {"connect_args": {"timeout": 60}}
    for attempt in range(_INIT_ATTEMPTS - 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError):
            # Another process opening the new file at the same moment (optuna-dashboard, a
            # script polling the study) creates the same tables and version row: "table ...
            # already exists" or "UNIQUE constraint failed: alembic_version". Once either of
            # them has finished, opening it again finds the schema in place.
            time.sleep(0.05 * (attempt + 1))
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)  # last try: its error is raised


class PrunedAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna PRUNED for trials that did not finish their budget.

    A trial that ended before ``max_t`` iterations, or diverged, is told as PRUNED; it carries
    the user attributes ``diverged`` and ``stopped_at``. ``warm_trials`` (finished Optuna trials of
    earlier searches, :mod:`lrsearch.tuning.warm_start`) are added to the study as it is created.
    """

    def __init__(self, *args: Any, max_t: int, num_trials: int | None = None, warm_trials: list[Any] = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # creates (or loads) the study
        self._max_t = max_t
        self._num_trials = num_trials
        self._asked: int | None = None  # this search's trials in the study, counted once per driver
        self._last_step: dict[str, int] = {}
        self._epochs: dict[str, dict[int, dict]] = {}  # the running trials' results, per epoch
        self._configs: dict[str, dict] = {}  # the running trials' configs, as suggested
        #: after :meth:`restore`: what the trials Tune's saved state never knew had trained
        self.lost_work: list[dict[str, Any]] = []
        # once per study: the mark keeps a study loaded again from its storage from growing twice.
        # Not kept on self: Tune pickles the searcher at every experiment checkpoint
        if warm_trials and not self._ot_study.user_attrs.get(WARM_START_ATTR):
            self._ot_study.add_trials(warm_trials)
            self._ot_study.set_user_attr(WARM_START_ATTR, len(warm_trials))

    @property
    def study(self) -> Any:
        """The Optuna study (for importances and the final trial list; not for per-trial use)."""
        return self._ot_study

    def suggest(self, trial_id: str) -> dict | str | None:
        new = trial_id not in self._ot_trials
        if new and self._num_trials is not None:
            if self._asked is None:
                self._asked = len(self._own_trials((TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)))
            if self._asked >= self._num_trials:
                # a resumed search whose study already holds every trial: the ones Tune's older
                # saved state never knew finished too (see restore)
                return Searcher.FINISHED
        config = super().suggest(trial_id)
        if new and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_ID_ATTR, trial_id)
            self._configs[trial_id] = config
            self._asked = (self._asked or 0) + 1
        return config

    def restore(self, checkpoint_path: str) -> None:
        """Restore the searcher Tune saved, and square it with the study, which is newer.

        Tune saves its state (this searcher's among it) on a period, not at each trial, while
        every trial's creation and end go to ``optuna.db`` at once. Trials created after Tune's last
        save are unknown to the restored Tune: the ones still running when the driver died are told
        FAIL (Tune starts others in their place); the finished ones stay, count towards
        ``num_trials`` (:meth:`suggest`), and join the results from their directories
        (:func:`unknown_to_tune`).
        """
        super().restore(checkpoint_path)
        self._asked = None
        known = set(self._ot_trials) | set(self._completed_trials)
        unknown = [t for t in self._own_trials(tuple(TrialState)) if t.user_attrs[TUNE_ID_ATTR] not in known]
        for trial in unknown:
            if trial.state == TrialState.RUNNING:
                self._ot_study.tell(trial.number, state=TrialState.FAIL)
        if unknown:
            # the restored sampler's random state is as old as Tune's save: it would draw again,
            # number for number, the params of the trials created since
            self._sampler.reseed_rng()
        self.lost_work = [_work(t, self._max_t) for t in unknown]

    def _own_trials(self, states: tuple[TrialState, ...]) -> list[Any]:
        return [t for t in self._ot_study.get_trials(deepcopy=False, states=states) if TUNE_ID_ATTR in t.user_attrs]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            # a resumed search replays a trial the study already holds finished: Tune's saved state
            # was older than optuna.db when the driver died
            self._completed_trials.add(trial_id)
            return
        if trial_id not in self._completed_trials:
            self._last_step[trial_id] = int(result.get(TRAINING_ITERATION, 0))
            self._keep(trial_id, result)

    def _keep(self, trial_id: str, result: dict) -> None:
        keys = (*_RECORD_KEYS, self.metric)
        row = {k: result[k] for k in keys if isinstance(result.get(k), (int, float, str, bool))}
        # keyed by epoch: a trial resumed from its checkpoint reports the epochs after it again
        self._epochs.setdefault(trial_id, {})[int(result.get(TRAINING_ITERATION, 0))] = row

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            if result and not error and trial_id in self._ot_trials and trial_id not in self._completed_trials:
                self._record(trial_id, result)
            self._complete(trial_id, result, error)
        except UpdateFinishedTrialError:
            self._completed_trials.add(trial_id)  # told before the driver died (see on_trial_result)
        finally:
            self._epochs.pop(trial_id, None)
            self._configs.pop(trial_id, None)
            if trial_id in self._completed_trials:
                # told: the handle is not needed again, and the searcher's saved state (pickled by
                # Tune at every experiment checkpoint) stays the size of the running trials
                self._ot_trials.pop(trial_id, None)

    def _record(self, trial_id: str, result: dict) -> None:
        """Keep the trial's config and per-epoch results with it in optuna.db: if the driver dies
        before Tune saves its state again, a resume rebuilds the trial's result from them
        (:func:`tune_record`)."""
        self._keep(trial_id, result)
        epochs = self._epochs[trial_id]
        config = json.loads(json.dumps(self._configs.get(trial_id) or result.get("config") or {}, default=str))
        self._ot_trials[trial_id].set_user_attr(RECORD_ATTR, {"config": config,
                                                              "epochs": [epochs[k] for k in sorted(epochs)]})

    def _complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        last = self._last_step.pop(trial_id, None)
        if error or not result or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        diverged = bool(result.get("diverged"))
        step = int(result.get(TRAINING_ITERATION, 0))
        if not diverged and step >= self._max_t:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        value = result.get(self.metric)
        if value is not None and step != last:
            # Tune hands the result ASHA stopped on to on_trial_complete only, never to
            # on_trial_result: report it, so TPE ranks the pruned trial by how far it got.
            ot_trial.report(float(value), step)
        ot_trial.set_user_attr("diverged", diverged)
        ot_trial.set_user_attr("stopped_at", step)
        self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
        return None


def unknown_to_tune(study: Any, known: set[str]) -> dict[str, int]:
    """``{tune_trial_id: optuna number}`` of the finished trials of this search that Tune's results
    lack (``known``): those created after Tune's last saved state, before the driver died."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return {t.user_attrs[TUNE_ID_ATTR]: t.number for t in finished
            if TUNE_ID_ATTR in t.user_attrs and t.user_attrs[TUNE_ID_ATTR] not in known}


def _work(trial: Any, max_t: int) -> dict[str, Any]:
    """What one trial trained: its epochs, their seconds (``None``: not kept), whether it ended,
    and its value where it trained all ``max_t`` epochs."""
    record = trial.user_attrs.get(RECORD_ATTR)
    ended = trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
    if record and record["epochs"]:
        last = record["epochs"][-1]
        full = last.get(TRAINING_ITERATION, 0) >= max_t and not last.get("diverged")
        return {"epochs": len(record["epochs"]), "seconds": float(last.get("time_total_s") or 0.0),
                "ended": ended, "value": trial.value if full and trial.state == TrialState.COMPLETE else None}
    return {"epochs": len(trial.intermediate_values), "seconds": None, "ended": ended, "value": None}


def tune_record(trial: Any, path: str) -> Any:
    """A Ray Tune ``Result`` rebuilt from an Optuna trial's record (:data:`RECORD_ATTR`), for a
    finished trial whose own result files the killed driver never wrote; ``None`` without one."""
    import pandas as pd
    from ray.tune import Result

    record = trial.user_attrs.get(RECORD_ATTR)
    if not record or not record["epochs"]:
        return None
    epochs = record["epochs"]
    return Result(metrics={**epochs[-1], "config": record["config"]}, checkpoint=None, error=None, path=path,
                  metrics_dataframe=pd.DataFrame(epochs))


def study_trials(study: Any) -> list[dict[str, Any]]:
    """Every Optuna trial's number, state, value, params and user attributes (read once)."""
    return [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
         "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
         "user_attrs": t.user_attrs}
        for t in study.get_trials(deepcopy=False)
    ]


def importances(study: Any) -> dict[str, float]:
    """Each parameter's importance for the objective (Optuna's fANOVA evaluator), summing to 1.

    Computed on the trials that completed their budget; pruned trials' values are partial. A
    conditional parameter (``cosine/warmup_frac``) is judged on the trials that sampled it.
    Empty when fewer than two completed trials differ.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0), normalize=True)
    except Exception:  # noqa: BLE001 - informative only: never lose a finished search to it
        # e.g. fANOVA's `assert variance >= 0` when completed trials share every varied value
        return {}
    return {name: float(value) for name, value in found.items()}
