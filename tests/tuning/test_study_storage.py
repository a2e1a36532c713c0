"""The study's Optuna storage opened by several processes at once: a search's driver creating
``optuna.db`` while optuna-dashboard, or a script polling the study, opens the same new file."""

from __future__ import annotations

import threading

import optuna

from lrsearch.tuning.optuna_adapter import study_storage


def _open_at_once(path: str, openers: int) -> tuple[list, list[str]]:
    start, storages, errors = threading.Barrier(openers), [], []

    def open_it():
        start.wait()
        try:
            storages.append(study_storage(path))
        except Exception as e:  # noqa: BLE001 - the test reports every failure
            errors.append(repr(e))

    threads = [threading.Thread(target=open_it) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return storages, errors


def test_many_openers_of_a_new_study_file_all_succeed(tmp_path):
    # Without the retry, 7 of 8 openers failed in every round here: "UNIQUE constraint failed:
    # alembic_version.version_num" or "table studies already exists".
    for round_ in range(3):
        storages, errors = _open_at_once(str(tmp_path / f"optuna-{round_}.db"), 8)
        assert errors == [] and len(storages) == 8
        # one schema: a study written through one opener is read through another
        study = optuna.create_study(study_name="s", storage=storages[0])
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        assert len(optuna.load_study(study_name="s", storage=storages[-1]).trials) == 2


def test_in_memory_when_there_is_no_path():
    assert study_storage(None) is None


def _lr_space(trial) -> None:
    trial.suggest_float("max_lr", 1e-5, 1e-2, log=True)


def _searcher(path: str, num_trials: int):
    from lrsearch.tuning.optuna_adapter import PrunedAwareOptunaSearch, make_sampler

    return PrunedAwareOptunaSearch(space=_lr_space, metric="acc", mode="max", storage=study_storage(path),
                                   sampler=make_sampler("random", seed=0, num_trials=num_trials),
                                   study_name="s", max_t=1, num_trials=num_trials)


def test_a_resume_squares_tunes_older_saved_state_with_the_newer_study(tmp_path):
    from ray.tune.search import Searcher

    from lrsearch.tuning.optuna_adapter import TUNE_ID_ATTR, tune_record, unknown_to_tune

    db = str(tmp_path / "optuna.db")
    live = _searcher(db, num_trials=5)
    for tid in ("a", "b", "c"):
        assert live.suggest(tid) is not None
    live.on_trial_complete("a", {"acc": 0.5, "training_iteration": 1})
    live.save(str(tmp_path / "searcher.pkl"))  # Tune's last saved state: a done, b and c running
    suggested = {tid: live.suggest(tid) for tid in ("d", "e")}
    assert None not in suggested.values()
    for tid, acc in (("b", 0.6), ("d", 0.7)):
        live.on_trial_complete(tid, {"acc": acc, "training_iteration": 1})
    # the driver dies: c (known to Tune) and e (not) were running; d finished unknown to Tune

    restored = _searcher(db, num_trials=5)
    restored.restore(str(tmp_path / "searcher.pkl"))
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    state = {t.user_attrs[TUNE_ID_ATTR]: t.state.name for t in study.trials}
    assert state == {"a": "COMPLETE", "b": "COMPLETE", "c": "RUNNING", "d": "COMPLETE", "e": "FAIL"}
    # the study's finished trial Tune's results will lack, to be read from its directory
    assert unknown_to_tune(study, {"a", "b", "c"}) == {"d": 3}
    # what they trained, for the budget's ledger: d ended after its epoch, e was told FAIL at none
    assert sorted(restored.lost_work, key=lambda w: w["epochs"]) == [
        {"epochs": 0, "seconds": None, "ended": False, "value": None},
        {"epochs": 1, "seconds": 0.0, "ended": True, "value": 0.7}]
    # ... or, where the killed driver never wrote Tune's files there, from the study's own record
    rebuilt = tune_record(study.trials[3], str(tmp_path / "d"))
    assert rebuilt.metrics["acc"] == 0.7 and rebuilt.metrics["training_iteration"] == 1
    assert rebuilt.metrics_dataframe["acc"].tolist() == [0.7] and rebuilt.config == suggested["d"]
    # Tune re-runs c and b from its older state (the study keeps their first values) and asks for
    # trials until its own count of 5: one more fits (a, b, c, d + 1), then no more
    restored.on_trial_complete("b", {"acc": 0.1, "training_iteration": 1})
    f = restored.suggest("f")
    # the sampler Tune saved is as old as its state: reseeded, it does not draw d's and e's again
    assert f is not None and f not in (suggested["d"], suggested["e"])
    assert restored.suggest("g") == Searcher.FINISHED
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    values = {t.user_attrs[TUNE_ID_ATTR]: t.value for t in study.trials}
    assert values["b"] == 0.6 and values["d"] == 0.7
