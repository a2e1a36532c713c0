"""The Optuna side of the search: a searcher that tells Optuna the truth about pruned trials.

Ray's ``OptunaSearch`` reports a trial that ASHA stopped early as COMPLETE with its partial value,
so TPE would learn from truncated runs as if they had finished. :class:`PrunedAwareOptunaSearch`
tells such trials, and diverged ones, as PRUNED (their per-epoch values are already reported as
intermediate values). Per-trial work is O(1): no copy of the study, no file written per trial.
"""

from __future__ import annotations

import time
from typing import Any

from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

__all__ = ["PrunedAwareOptunaSearch", "make_sampler", "study_storage"]

_INIT_ATTEMPTS = 5

#: ``search.algorithm`` -> a function building the Optuna sampler
ALGORITHMS = ("tpe", "random")


def make_sampler(algorithm: str, *, seed: int, num_trials: int) -> Any:
    """The Optuna sampler for ``search.algorithm`` (``tpe`` or ``random``), seeded."""
    from optuna.samplers import RandomSampler, TPESampler

    if algorithm == "random":
        return RandomSampler(seed=seed)
    if algorithm == "tpe":
        # a few random trials first (TPE needs data), at most half the budget on small searches
        return TPESampler(seed=seed, n_startup_trials=max(1, min(5, num_trials // 2)))
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
    the user attributes ``diverged`` and ``stopped_at``.
    """

    def __init__(self, *args: Any, max_t: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_t = max_t
        self._last_step: dict[str, int] = {}

    @property
    def study(self) -> Any:
        """The Optuna study (for importances and the final trial list; not for per-trial use)."""
        return self._ot_study

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

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            self._complete(trial_id, result, error)
        except UpdateFinishedTrialError:
            self._completed_trials.add(trial_id)  # told before the driver died (see on_trial_result)
        finally:
            if trial_id in self._completed_trials:
                # told: the handle is not needed again, and the searcher's saved state (pickled by
                # Tune at every experiment checkpoint) stays the size of the running trials
                self._ot_trials.pop(trial_id, None)

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
