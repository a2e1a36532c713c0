"""The public Python API on a real local Ray: an in-memory task searched from a Python session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import mlflow_uri
from torch.utils.data import DataLoader, TensorDataset

import lrsearch
from lrsearch import BestConfig, TrialRecord, TrialState

EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "synthetic.yaml")


def _job(tmp_path, name: str, **search) -> dict:
    return {
        "name": name,
        "task": {"kind": "synthetic", "num_train": 256, "num_val": 128, "batch_size": 64},
        "range_test": {"num_steps": 30},
        "search": {"num_trials": 4, "max_epochs": 2, "max_concurrent_trials": 2, **search},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_uri(tmp_path)},
    }


def test_public_names_stay_functions_whatever_is_imported():
    # a submodule named like a function would replace it on the package once imported
    import lrsearch.api  # noqa: F401
    import lrsearch.engine.trial  # noqa: F401
    import lrsearch.job  # noqa: F401
    import lrsearch.output.formats  # noqa: F401
    import lrsearch.range_test.finder  # noqa: F401
    import lrsearch.tuning  # noqa: F401

    homes = {"search": "lrsearch.api", "find_lr": "lrsearch.api", "export": "lrsearch.api", "train": "lrsearch.api",
             "load_job": "lrsearch.job.parse"}
    for name, home in homes.items():
        assert callable(getattr(lrsearch, name)) and getattr(lrsearch, name).__module__ == home
    assert set(lrsearch.__all__) <= set(dir(lrsearch))


def test_the_contracts_module_paths_import_as_documented():
    # DESIGN's contract: lrsearch.schedules.{SCHEDULES, build_scheduler}, lrsearch.range_test.lr_range_test
    import torch

    from lrsearch.optim import schedules as home
    from lrsearch.range_test import RangeTestResult, lr_range_test
    from lrsearch.schedules import SCHEDULES, build_scheduler

    assert SCHEDULES is home.SCHEDULES and build_scheduler is home.build_scheduler
    assert {"linear", "cosine", "stlr", "cosine_annealing", "cosine_restarts", "exponential", "step",
            "one_cycle", "constant"} <= set(SCHEDULES)
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-3)
    scheduler = build_scheduler(optimizer, "linear", 10, warmup_frac=0.2)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    with pytest.raises(ValueError, match="warmup_fraction"):
        build_scheduler(optimizer, "linear", 10, warmup_fraction=0.2)
    assert callable(lr_range_test) and hasattr(RangeTestResult, "bounds")


def test_load_job_takes_a_path_a_dict_or_a_job(tmp_path):
    from_path = lrsearch.load_job(EXAMPLE)
    assert from_path.name == "synthetic" and from_path.search.num_trials == 8
    from_dict = lrsearch.load_job({"name": "d", "task": {"kind": "synthetic"}})
    assert lrsearch.load_job(from_dict) is from_dict
    with pytest.raises(lrsearch.ConfigError, match="job: got int"):
        lrsearch.load_job(3)
    with pytest.raises(lrsearch.ConfigError, match=r"search.algorithm: got 'bayes'"):
        lrsearch.load_job({"name": "d", "task": {"kind": "synthetic"}, "search": {"algorithm": "bayes"}})


def _session_task() -> lrsearch.Task:
    """A model and data that exist only in this process (defined here, not importable by name)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    y = (x @ torch.randn(12, 3, generator=g)).argmax(1)
    data = TensorDataset(x, y)
    width = 24  # captured by the closure below: travels by value

    def build_model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(12, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))

    return lrsearch.Task(name="session-mlp", build_model=build_model,
                         train_loader=DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator()),
                         val_loader=DataLoader(data, batch_size=128), criterion=torch.nn.functional.cross_entropy)


@pytest.fixture(scope="module")
def in_memory_search(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    start = {"max_lr": 5e-5, "schedule": "linear", "warmup_frac": 0.0}
    res = lrsearch.search(_job(tmp, "mem", num_trials=5, start_points=[start]), task=_session_task)
    return tmp, res


def test_search_an_in_memory_task_and_read_the_typed_result(in_memory_search):
    tmp, res = in_memory_search
    assert isinstance(res, lrsearch.SearchResult) and len(res.trials) == 5
    assert all(isinstance(t, TrialRecord) and isinstance(t.state, TrialState) for t in res.trials)
    assert [t.number for t in res.trials] == [1, 2, 3, 4, 5]
    # the job's task was synthetic with 256 examples of 32 features at batch 64 (4 steps per
    # epoch); the in-memory task has 256 examples at batch 32: 8 steps per epoch
    assert res.steps_per_epoch == 8
    first = res.trials[0]
    assert first.max_lr == 5e-5 and first.schedule == "linear" and first.params == {"warmup_frac": 0.0}
    assert isinstance(res.best, BestConfig) and res.best.value == max(
        t.final_metric for t in res.trials if t.state is TrialState.COMPLETED)
    assert res.best.search_horizon["total_steps"] == 16
    assert res.best.scheduler_params(1000)  # horizon-free: resolves for any run length
    # compute: epochs trained by the trials, and the range test's 30 steps in trial epochs
    assert res.trial_epochs == sum(t.stopped_at_epoch for t in res.trials)
    assert res.range_test_epochs == pytest.approx(len(res.range_test["lrs"]) / 8)
    # the Parquet table holds the same records
    rows = pq.read_table(res.paths["trials"]).to_pylist()
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in res.trials]
    assert [r["state"] for r in rows] == [t.state.value for t in res.trials]


def test_summary_on_disk_matches_the_result_and_says_how_long_it_took(in_memory_search):
    _, res = in_memory_search
    summary = json.loads(Path(res.paths["summary"]).read_text())
    assert res.seconds > 0 and summary["seconds"] == round(res.seconds, 1)  # was 0.0 on disk
    assert summary["counts"] == res.counts and summary["best_metric"] == res.best.value
    assert summary["importances"] == res.importances


def test_the_study_is_persisted_where_optunas_tools_open_it(in_memory_search):
    _, res = in_memory_search
    study = optuna.load_study(study_name="mem", storage=res.paths["optuna_study"])
    assert len(study.trials) == 5
    states = {t.number + 1: t.state.name for t in study.trials}  # optuna counts from 0
    for t in res.trials:
        assert states[t.number] == {"completed": "COMPLETE", "pruned": "PRUNED", "diverged": "PRUNED"}[t.state.value]
    if res.importances:
        assert set(res.importances) <= {"max_lr", "schedule"} and sum(res.importances.values()) == pytest.approx(1)


def test_export_takes_the_result_itself(in_memory_search):
    _, res = in_memory_search
    text, note = lrsearch.export(res, format="yaml")
    exported = yaml.safe_load(text)
    assert exported["schedule"] == res.best.schedule and exported["max_lr"] == res.best.max_lr
    with pytest.raises(lrsearch.ConfigError, match="exactly one"):
        lrsearch.export(res, experiment="x")


def test_random_search_without_early_stopping_trains_every_trial_fully(local_ray, tmp_path):
    res = lrsearch.search(_job(tmp_path, "rand", algorithm="random", early_stopping="none", num_trials=4,
                               grace_period=1), track=False)
    assert [t.state for t in res.trials] == [TrialState.COMPLETED] * 4
    assert all(t.stopped_at_epoch == 2 for t in res.trials)
    # random search: every trial's max_lr drawn independently within the range-test bounds
    low, high = res.range_test["bounds"]
    assert all(low <= t.max_lr <= high for t in res.trials[1:])
    assert res.tracking is None and "mlflow_run" not in res.paths


def _unlearning_task() -> lrsearch.Task:
    """The session task with a loss that falls as accuracy falls (the true class's probability):
    ranking by validation loss and ranking by accuracy disagree."""
    task = _session_task()

    def true_class_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1).gather(1, targets[:, None]).mean()

    task.criterion = true_class_probability
    return task


def test_asha_can_rank_its_rungs_by_validation_loss(local_ray, tmp_path):
    # one trial at a time, so ASHA's decisions can be replayed: at the rung (epoch 1) a trial stops
    # when its value is worse than the median of those recorded there before it (reduction factor 2)
    res = lrsearch.search(_job(tmp_path, "rung", rung_metric="val_loss", num_trials=8, max_epochs=2,
                               max_concurrent_trials=1, reduction_factor=2),
                          task=_unlearning_task, track=False)
    trials = sorted(res.trials, key=lambda t: t.number)
    assert len(trials) == 8 and res.metric == "val_accuracy"
    by_loss, by_accuracy, losses, accuracies = [], [], [], []
    for t in trials:
        loss, accuracy = t.val_loss_per_epoch[0], t.metric_per_epoch[0]
        by_loss.append(bool(losses) and bool(loss > np.percentile(losses, 50)))
        by_accuracy.append(bool(accuracies) and bool(accuracy < np.percentile(accuracies, 50)))
        losses.append(loss)
        accuracies.append(accuracy)
    assert by_loss != by_accuracy  # the task is what it means to be: the two rankings disagree
    assert [t.state == TrialState.PRUNED for t in trials] == by_loss
    # the best is still the objective's best among the finished trials
    finished = [t for t in trials if t.state == TrialState.COMPLETED]
    assert res.best.value == max(t.final_metric for t in finished)


def test_a_range_test_that_shows_no_descent_is_a_note_and_the_trials_stay_in_its_sweep(local_ray, tmp_path):
    job = _job(tmp_path, "flat", algorithm="random", early_stopping="none", num_trials=2, max_epochs=1)
    job["range_test"] = {"num_steps": 30, "start_lr": 1e-12, "end_lr": 1e-10}
    res = lrsearch.search(job, track=False)
    assert any(n.startswith("range test: the smoothed loss never fell") for n in res.notes), res.notes
    assert all(1e-12 <= t.max_lr <= 1e-10 for t in res.trials)


def test_a_start_point_naming_another_schedule_is_one_clear_error(tmp_path):
    job = _job(tmp_path, "bad", start_points=[{"max_lr": 1e-3, "schedule": "one_cycle", "warmup_frac": 0.1}])
    with pytest.raises(lrsearch.ConfigError, match=r"start_points\[0\]\.warmup_frac: unknown for schedule 'one_cycle'"):
        lrsearch.search(job)
    job = _job(tmp_path, "bad", start_points=[{"max_lr": -1, "schedule": "linear"}])
    with pytest.raises(lrsearch.ConfigError, match=r"start_points\[0\].max_lr: needs a number > 0"):
        lrsearch.load_job(job)
    assert not (tmp_path / "runs").exists()  # nothing started
