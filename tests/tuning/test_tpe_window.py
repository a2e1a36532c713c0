"""TPE's view of a long study: the whole study up to the window, then the newest and the best."""

from __future__ import annotations

import optuna
import pytest

from lrsearch.tuning.tpe_window import WindowedSampler, _View

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(trial) -> float:
    lr = trial.suggest_float("max_lr", 1e-5, 1e-1, log=True)
    schedule = trial.suggest_categorical("schedule", ["constant", "cosine"])
    warmup = trial.suggest_float("cosine/warmup_frac", 0.0, 0.3) if schedule == "cosine" else 0.0
    return -abs(lr - 3e-3) - warmup  # a peak at 3e-3, no warmup


def _draws(sampler, n: int) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for i in range(n):
        trial = study.ask()
        value = _space(trial)
        if i % 3 == 2:  # some pruned, as ASHA leaves them
            trial.report(value, 1)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    return [t.params for t in study.trials]


def test_up_to_the_window_the_suggestions_are_tpes_own():
    plain = _draws(optuna.samplers.TPESampler(seed=3, n_startup_trials=5), 40)
    windowed = _draws(WindowedSampler(optuna.samplers.TPESampler(seed=3, n_startup_trials=5), size=40), 40)
    assert windowed == plain


def test_past_the_window_tpe_sees_the_newest_and_the_best_older_trials():
    study = optuna.create_study(direction="maximize", sampler=WindowedSampler(
        optuna.samplers.TPESampler(seed=0, n_startup_trials=5), size=30, best=5))
    study.optimize(_space, n_trials=80)
    seen = _View(study, 30, 5, {})._get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 80 and len(seen) == 35
    assert [t.number for t in seen[-30:]] == list(range(50, 80))
    best_older = sorted((t for t in complete if t.number < 50), key=lambda t: t.value, reverse=True)[:5]
    assert sorted(t.number for t in seen[:5]) == sorted(t.number for t in best_older)
    # and it still finds the peak
    assert study.best_params["max_lr"] == pytest.approx(3e-3, rel=0.5)
