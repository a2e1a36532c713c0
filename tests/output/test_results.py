"""Typed trial records from Ray Tune's own Result objects, the best config, and the file edge."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from ray.tune import Result

from lrsearch.output.results import (
    TrialState,
    best_config,
    trial_records,
    write_best_config,
    write_trial_table,
)

OPTIMIZER = {"name": "adamw", "weight_decay": 0.01, "momentum": 0.9, "betas": [0.9, 0.999], "eps": 1e-8}


def _result(trial_id: str, number: int, config: dict, values: list[float], *, diverged=False, error=None):
    df = pd.DataFrame({"training_iteration": list(range(1, len(values) + 1)), "val_accuracy": values,
                       "train_loss": [1.0] * len(values), "train_seconds": [0.5] * len(values)})
    metrics = {"trial_id": trial_id, "training_iteration": len(values), "diverged": diverged,
               "val_accuracy": values[-1] if values else None, "time_total_s": 2.0, "config": config}
    return Result(metrics=metrics, checkpoint=None, error=error,
                  path=f"/runs/tune/run_trial_{trial_id}_{number}_max_lr=0.001", metrics_dataframe=df)


GRID = [
    _result("bbb", 2, {"max_lr": 1e-3, "schedule": "linear", "linear": {"warmup_frac": 0.1}}, [0.5, 0.7, 0.8]),
    _result("aaa", 1, {"max_lr": 2e-3, "schedule": "step", "step": {"step_size_frac": 0.5, "gamma": 0.1}},
            [0.6, 0.9, 0.85]),
    _result("ccc", 3, {"max_lr": 5e-2, "schedule": "constant", "constant": {}}, [0.95]),
    _result("ddd", 4, {"max_lr": 9.0, "schedule": "constant", "constant": {}}, [0.0], diverged=True),
]


def test_records_are_typed_ordered_by_creation_and_state_is_decided_by_the_budget():
    trials = trial_records(GRID, metric="val_accuracy", max_epochs=3, total_steps=30)
    assert [t.trial_id for t in trials] == ["aaa", "bbb", "ccc", "ddd"]
    assert [t.state for t in trials] == [TrialState.COMPLETED, TrialState.COMPLETED, TrialState.PRUNED,
                                          TrialState.DIVERGED]
    step = trials[0]
    assert step.params == {"step_size_frac": 0.5, "gamma": 0.1}  # horizon-free, as sampled
    assert step.schedule_params == {"step_size": 15, "gamma": 0.1}  # resolved for the 30 steps
    assert step.final_metric == 0.85 and step.train_seconds == 1.5


def test_the_best_config_is_the_best_completed_trial_horizon_free():
    trials = trial_records(GRID, metric="val_accuracy", max_epochs=3, total_steps=30)
    best = best_config(trials, mode="max", metric="val_accuracy", optimizer=OPTIMIZER, epochs=3,
                       steps_per_epoch=10, total_steps=30)
    # "ccc" reached 0.95 but was pruned at epoch 1: a partial value is not a result
    assert best.trial_id == "aaa" and best.value == 0.85
    assert best.params == {"step_size_frac": 0.5, "gamma": 0.1}
    assert best.search_horizon == {"epochs": 3, "steps_per_epoch": 10, "total_steps": 30,
                                   "schedule_params": {"step_size": 15, "gamma": 0.1}}
    assert best.scheduler_params(1000) == {"step_size": 500, "gamma": 0.1}
    assert best_config(trials[2:], mode="max", metric="val_accuracy", optimizer=OPTIMIZER, epochs=3,
                       steps_per_epoch=10, total_steps=30) is None


def test_a_schedule_parameter_the_schedule_rejects_is_an_error_not_an_empty_dict():
    # it used to be swallowed into {}, and the exported best config lost its schedule parameters
    bad = _result("eee", 1, {"max_lr": 1e-3, "schedule": "linear", "linear": {"warmup_frac": 7.0}}, [0.5])
    with pytest.raises(ValueError, match="warmup_frac"):
        trial_records([bad], metric="val_accuracy", max_epochs=1, total_steps=10)


def test_files_hold_the_same_records(tmp_path):
    trials = trial_records(GRID, metric="val_accuracy", max_epochs=3, total_steps=30)
    rows = pq.read_table(write_trial_table(trials, tmp_path)).to_pylist()
    assert [r["state"] for r in rows] == ["completed", "completed", "pruned", "diverged"]
    assert rows[0]["final_metric"] == 0.85 and rows[0]["metric_per_epoch"] == [0.6, 0.9, 0.85]
    best = best_config(trials, mode="max", metric="val_accuracy", optimizer=OPTIMIZER, epochs=3,
                       steps_per_epoch=10, total_steps=30)
    assert yaml.safe_load(write_best_config(best, tmp_path).read_text()) == best.to_dict()
