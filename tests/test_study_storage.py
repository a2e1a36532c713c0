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
