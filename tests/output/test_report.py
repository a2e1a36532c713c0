"""lrsearch.output.report: the search summary, the range-test table, the schedule listing and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lrsearch.job.space import schedule_params
from lrsearch.optim.schedules import SCHEDULES
from lrsearch.output.report import (
    plot_lr_curves,
    plot_search,
    range_test_table,
    schedules_json,
    search_tables,
)
from lrsearch.output.results import BestConfig, SearchResult, TrialRecord, TrialState
from lrsearch.range_test import SUGGESTION_METHODS, lr_range_test
from lrsearch.tasks import synthetic_task

PNG = b"\x89PNG\r\n\x1a\n"
TOTAL = 100


def _render(*renderables) -> str:
    console = Console(record=True, width=200)
    for r in renderables:
        console.print(r)
    return console.export_text()


def _flat(text: str) -> str:
    """The text with every run of whitespace as one space (a table's caption may wrap)."""
    return " ".join(text.split())


def _trial(trial_id: str, number: int, schedule: str | None, max_lr: float | None, state: TrialState,
           metrics: list[float], params: dict | None = None) -> TrialRecord:
    config = {"max_lr": max_lr, "schedule": schedule, schedule: params or {}} if schedule else {}
    return TrialRecord(
        trial_id=trial_id, number=number, schedule=schedule, max_lr=max_lr, config=config,
        schedule_params=schedule_params(config, TOTAL) if schedule else {}, state=state,
        stopped_at_epoch=len(metrics), metric_per_epoch=metrics,
        train_loss_per_epoch=[1.0 / (i + 1) for i in range(len(metrics))],
    )


def _trials() -> list[TrialRecord]:
    return [
        _trial("trial_good", 1, "cosine", 3e-4, TrialState.COMPLETED, [0.5, 0.8],
               {"warmup_frac": 0.1, "min_lr_ratio": 0.0}),
        _trial("trial_best", 2, "linear", 1.234e-4, TrialState.COMPLETED, [0.6, 0.9],
               {"warmup_frac": 0.05}),
        _trial("trial_pruned", 3, "stlr", 5e-4, TrialState.PRUNED, [0.95], {"cut_frac": 0.2}),
        _trial("trial_diverged", 4, "one_cycle", 0.5, TrialState.DIVERGED, [0.0]),
        _trial("trial_errored", 5, "constant", 1e-3, TrialState.ERRORED, []),
    ]


def _best(trials: list[TrialRecord]) -> BestConfig:
    t = trials[1]
    return BestConfig(
        schedule=t.schedule, max_lr=t.max_lr, params=t.params, optimizer={"name": "adamw"},
        layer_decay=None, metric="val_accuracy", value=t.final_metric, trial_id=t.trial_id,
        search_horizon={"epochs": 2, "steps_per_epoch": 50, "total_steps": TOTAL,
                        "schedule_params": t.schedule_params},
    )


def _result(**overrides) -> SearchResult:
    trials = overrides.pop("trials", None) or _trials()
    fields = dict(
        best=_best(trials), trials=trials, metric="val_accuracy", mode="max", range_test=None,
        steps_per_epoch=50,
        paths={"results": "/runs/t", "best_config": "/runs/t/best_config.yaml",
               "optuna_study": "sqlite:////runs/t/optuna.db"},
        importances={"max_lr": 0.7, "schedule": 0.25, "linear/warmup_frac": 0.05},
        seconds=12.3, experiment="exp1",
    )
    fields.update(overrides)
    return SearchResult(**fields)


def _row_order(text: str) -> list[str]:
    ids = [t.trial_id for t in _trials()]
    rows = []
    for line in text.splitlines():
        found = [i for i in ids if i in line]
        rows += found
    return rows


# --------------------------------------------------------------------------------------------
# search_tables
# --------------------------------------------------------------------------------------------


def test_best_first_then_the_rest_pruned_and_diverged_after_completed():
    text = _render(*search_tables(_result()))
    # the pruned trial's 0.95 beats the best, but a partial budget never ranks above a full one;
    # the errored trial has no metric and is not listed
    assert _row_order(text) == ["trial_best", "trial_good", "trial_pruned", "trial_diverged"]
    best_row = next(line for line in text.splitlines() if "trial_best" in line)
    for cell in ("linear", "0.000123", "warmup_frac=0.05", "completed", "0.9000"):
        assert cell in best_row
    pruned_row = next(line for line in text.splitlines() if "trial_pruned" in line)
    assert "pruned" in pruned_row and "0.9500" in pruned_row
    assert "best trials by val_accuracy (max)" in text


def test_min_mode_ranks_the_lowest_first():
    trials = [
        _trial("trial_high", 1, "linear", 1e-3, TrialState.COMPLETED, [0.9, 0.7]),
        _trial("trial_low", 2, "cosine", 1e-3, TrialState.COMPLETED, [0.8, 0.3]),
        _trial("trial_pruned", 3, "linear", 1e-3, TrialState.PRUNED, [0.1]),
    ]
    text = _render(*search_tables(_result(trials=trials, mode="min", metric="val_loss", best=None)))
    order = [i for line in text.splitlines()
             for i in ("trial_high", "trial_low", "trial_pruned") if i in line]
    assert order == ["trial_low", "trial_high", "trial_pruned"]
    assert "best trials by val_loss (min)" in text


def test_top_limits_the_rows():
    text = _render(*search_tables(_result(), top=2))
    assert _row_order(text) == ["trial_best", "trial_good"]


def test_counts_caption():
    text = _flat(_render(*search_tables(_result())))
    assert "5 trials: 2 completed, 1 pruned early, 1 diverged, 1 errored; 12 s" in text


def test_importances_line_when_set_and_absent_when_empty():
    text = _render(*search_tables(_result()))
    assert ("what mattered (Optuna fANOVA importance over completed trials): "
            "max_lr 0.70, schedule 0.25, linear/warmup_frac 0.05") in text
    assert "what mattered" not in _render(*search_tables(_result(importances={})))


def test_best_line_with_its_params_and_the_file_lines():
    text = _render(*search_tables(_result()))
    assert "best: linear max_lr=0.000123 (warmup_frac=0.05) -> val_accuracy 0.9000" in text
    assert "no trial completed" not in text
    assert ("best config: /runs/t/best_config.yaml "
            "(or: lrsearch export --experiment exp1 --format hf|torch)") in text
    assert "results:     /runs/t/  (trials.parquet, summary.json, tune/)" in text
    assert "study:       optuna-dashboard sqlite:////runs/t/optuna.db" in text
    assert "MLflow" not in text  # no tracking


def test_no_dashboard_line_without_a_study():
    text = _render(*search_tables(_result(paths={"results": "/runs/t"})))
    assert "optuna-dashboard" not in text and "best config:" not in text
    assert "results:     /runs/t/" in text


def test_no_trial_completed():
    trials = [t for t in _trials() if t.state is not TrialState.COMPLETED]
    text = _render(*search_tables(_result(trials=trials, best=None, importances={})))
    assert "no trial completed its full budget" in text
    assert "best:" not in text
    assert _row_order(text) == ["trial_pruned", "trial_diverged"]
    assert "3 trials: 0 completed, 1 pruned early, 1 diverged, 1 errored" in _flat(text)


def test_mlflow_lines():
    local = _render(*search_tables(_result(tracking={"uri": "sqlite:///mlruns.db", "run_id": "r1"},
                                           paths={"results": "/runs/t", "mlflow_pending": "3"})))
    assert "MLflow:      sqlite:///mlruns.db, run r1" in local
    assert "3 logging operations pending: lrsearch sync /runs/t" in local
    assert "mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1" in local
    here = _render(*search_tables(_result(tracking={"uri": f"sqlite:///{Path('mlflow.db').resolve()}",
                                                    "run_id": "r1"}, paths={"results": "/runs/t"})))
    assert "see it: mlflow ui --host 127.0.0.1" in here and "--backend-store-uri" not in here
    remote = _render(*search_tables(_result(tracking={"uri": "http://mlflow:5000", "run_id": "r1"},
                                            paths={"results": "/runs/t", "mlflow_pending": "0"})))
    assert "MLflow:      http://mlflow:5000, run r1" in remote
    assert "pending" not in remote and "mlflow ui" not in remote


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


@pytest.mark.parametrize("which", ["all", "none_completed", "only_diverged", "empty"])
def test_plot_search_writes_a_png(tmp_path, which):
    trials = _trials()
    trials = {
        "all": trials,
        "none_completed": [t for t in trials if t.state is not TrialState.COMPLETED],
        "only_diverged": [t for t in trials if t.state is TrialState.DIVERGED],
        "empty": [],
    }[which]
    path = tmp_path / "search.png"
    assert plot_search(trials, str(path), "val_accuracy") == str(path)
    assert _is_png(path)


@pytest.mark.parametrize("which", ["completed", "with_diverged", "none"])
def test_plot_lr_curves_writes_a_png(tmp_path, which):
    trials = _trials()
    trials = {
        "completed": trials[:2],
        "with_diverged": [trials[1], trials[3]],
        "none": [],
    }[which]
    path = tmp_path / "curves.png"
    assert plot_lr_curves(trials, str(path), TOTAL) == str(path)
    assert _is_png(path)


# --------------------------------------------------------------------------------------------
# schedules_json
# --------------------------------------------------------------------------------------------


def test_schedules_json_lists_every_schedule_with_its_params():
    data = schedules_json()
    assert len(data) == len(SCHEDULES) == 11
    assert [s["name"] for s in data] == list(SCHEDULES)
    for entry in data:
        schedule = SCHEDULES[entry["name"]]
        assert [p["name"] for p in entry["params"]] == list(schedule.param_names)
        assert entry["summary"] == schedule.summary
        assert entry["reference"] == (schedule.reference or None)
        for p, param in zip(entry["params"], schedule.params, strict=True):
            assert p == {"name": param.name, "default": param.default_doc, "allowed": param.allowed(),
                         "doc": param.doc}
    assert json.loads(json.dumps(data)) == data  # plain JSON
    by_name = {s["name"]: s for s in data}
    assert by_name["stlr"]["reference"] is None
    restarts = {p["name"]: p for p in by_name["cosine_restarts"]["params"]}
    assert restarts["T_0"]["default"] == "total_steps // 4"
    assert restarts["T_0"]["allowed"] == "an integer >= 1"
    warmup = by_name["linear"]["params"][0]
    assert (warmup["default"], warmup["allowed"]) == ("0.1", "a number with 0 <= warmup_frac < 1")


# --------------------------------------------------------------------------------------------
# range_test_table
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def range_data():
    # 20 steps from where SGD starts to learn on this task: a descent that clears the batches' noise
    torch.manual_seed(0)
    task = synthetic_task(num_train=256, num_val=32, batch_size=32)
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    result = lr_range_test(model, optimizer, task.criterion, task.train_loader,
                           start_lr=1e-3, end_lr=10.0, num_steps=20)
    return result.to_dict()


def test_range_test_table_shows_the_suggestions_and_bounds(range_data):
    text = _render(range_test_table(range_data, title="LR range test: tiny"))
    assert "LR range test: tiny" in text
    lines = text.splitlines()
    assert set(range_data["suggestions"]) == set(SUGGESTION_METHODS)
    assert any(v is not None for v in range_data["suggestions"].values())
    for method, lr in range_data["suggestions"].items():
        row = next(line for line in lines if f"suggestion: {method}" in line)
        assert ("-" if lr is None else f"{lr:.3g}") in row
    low, high = range_data["bounds"]
    bounds_row = next(line for line in lines if "max_lr search bounds" in line)
    assert f"{low:.3g} .. {high:.3g}" in bounds_row
    caption = f"{len(range_data['lrs'])} steps, {range_data['stop_reason']}"
    if range_data["diverged_lr"] is not None:
        caption += f" at lr {range_data['diverged_lr']:.3g}"
    assert caption in _flat(text)
    assert 0 < len(range_data["lrs"]) <= 20


def test_range_test_table_marks_missing_suggestions_and_the_stop():
    data = {"suggestions": {"steepest": 1e-3, "valley": None}, "bounds": [1e-4, 3e-3],
            "stop_reason": "diverged", "diverged_lr": 0.5, "lrs": [1e-5] * 7}
    text = _render(range_test_table(data))
    assert "LR range test" in text
    valley = next(line for line in text.splitlines() if "suggestion: valley" in line)
    assert [c.strip() for c in valley.split("│") if c.strip()] == ["suggestion: valley", "-"]
    assert "0.0001 .. 0.003" in text
    assert "7 steps, diverged at lr 0.5" in _flat(text)
