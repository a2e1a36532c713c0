"""``search.budget``: the search starts no trial it cannot pay for, stops when the budget is spent,
keeps its best config, and goes on when resumed with a larger budget. Real Ray Tune, Optuna, ASHA
and MLflow; GPUs are Ray's logical resources (no device needed)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from conftest import mlflow_uri
from mlflow import MlflowClient
from typer.testing import CliRunner

from lrsearch.cli import app
from lrsearch.infra.jobs import last_progress, progress_text
from lrsearch.job.parse import parse_job
from lrsearch.tuning import run_search
from lrsearch.tuning.budget import FINISHED, START, WAIT, Ledger

runner = CliRunner()




def _job(tmp_path, name, *, task=None, resources=None, **search):
    return parse_job({
        "name": name,
        "task": {"kind": "synthetic", "num_train": 512, "num_val": 256, "batch_size": 64, **(task or {})},
        "range_test": {"enabled": False},
        "search": {"num_trials": 12, "max_epochs": 3, "grace_period": 2, "reduction_factor": 3,
                   "max_concurrent_trials": 2, "seed": 0, **search},
        "resources": resources or {"cpu": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_uri(tmp_path), "experiment": name},
    })


def _parent(tmp_path, experiment):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`lrsearch.role` = 'search'")
    return parent


# --------------------------------------------------------------------------------------------
# the job file
# --------------------------------------------------------------------------------------------

OK = "name: ok\ntask: {kind: synthetic, num_train: 256, num_val: 64}\n"


@pytest.mark.parametrize(("text", "fragments"), [
    (OK + "search: {budget: {trial_epochs: 5, wall_s: 60}}\n",
     ["search.budget", "'trial_epochs': 5", "one of trial_epochs, gpu_hours or wall_s"]),
    (OK + "search: {budget: {epochs: 5}}\n", ["search.budget.epochs", "unknown field", "trial_epochs"]),
    (OK + "search: {budget: {gpu_hours: 0}}\n", ["search.budget.gpu_hours", "got 0", "> 0"]),
    (OK + "search: {budget: 100}\n", ["search.budget", "got 100", "{trial_epochs: N}"]),
    (OK + "search: {budget: {gpu_hours: 2}}\n", ["search.budget.gpu_hours", "got 2", "resources.gpu is 0"]),
    (OK + "search: {budget: {wall_s: 60}, time_budget_s: 30}\n",
     ["search.time_budget_s", "got 30", "one of them"]),
    (OK + "search: {budget: {trial_epochs: 1}, grace_period: 2}\n",
     ["search.budget.trial_epochs", "got 1", "at least 2"]),
])
def test_a_bad_budget_is_one_line_naming_the_field_the_value_and_what_is_allowed(tmp_path, text, fragments):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["search", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_time_budget_s_is_the_wall_budget():
    base = {"name": "x", "task": {"kind": "synthetic"}}
    assert parse_job({**base, "search": {"time_budget_s": 12}}).search.budget_limit() == ("wall_s", 12.0)
    assert parse_job({**base, "search": {"budget": {"trial_epochs": 20}}}).search.budget_limit() == ("trial_epochs", 20)
    assert parse_job(base).search.budget_limit() is None


# --------------------------------------------------------------------------------------------
# the rule, on the ledger alone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("budget", "concurrency", "stops"), [(11, 2, 0.5), (23, 3, 0.3), (7, 1, 0.0)])
def test_the_ledger_never_overspends_and_every_trial_it_starts_reaches_its_first_rung(budget, concurrency, stops):
    # Tune's loop, played out: start what the ledger allows, train the running trials an epoch at a
    # time, stop some at the first rung (ASHA) and the rest at max_epochs or when the ledger says so
    import random

    rng = random.Random(budget)
    ledger = Ledger(("trial_epochs", budget), min_epochs=2, max_epochs=4, gpu=0.0, num_trials=100,
                    metric="acc", mode="max")
    trained, ids = {}, (f"t{i}" for i in itertools.count())
    while True:
        while len(ledger.running) < concurrency and ledger.can_start() == START:
            trial = next(ids)
            ledger.started(trial)
            trained[trial] = 0
        if not ledger.running:
            assert ledger.can_start() == FINISHED
            break
        trial = rng.choice(sorted(ledger.running))
        trained[trial] += 1
        ledger.record(trial, {"training_iteration": trained[trial], "time_this_iter_s": 1.0})
        ledger.record(trial, {"training_iteration": trained[trial]})  # a replay: not counted again
        asha_stops = trained[trial] == 2 and rng.random() < stops
        if asha_stops or trained[trial] == 4 or not ledger.may_continue(trial):
            ledger.ended(trial, {"training_iteration": trained[trial], "acc": 0.5})
    assert sum(trained.values()) == ledger.epochs <= budget
    assert budget - ledger.epochs < 2  # it stopped because the next trial's first rung did not fit
    assert all(n >= 2 for n in trained.values()), trained  # nothing started that was not paid for
    assert ledger.exhausted and ledger.snapshot()["budget"]["remaining"] == budget - ledger.epochs


def test_a_resume_after_a_kill_counts_the_trials_tunes_saved_state_lacks():
    # the driver died after Tune saved 6 trial-epochs (3 s each); the study holds two trials more:
    # one that ended after 4 epochs (14 s), one told FAIL after 2 (its seconds were not kept)
    saved = Ledger(("gpu_hours", 1.0), min_epochs=2, max_epochs=4, gpu=0.5, num_trials=10, metric="acc", mode="max")
    for epoch in (1, 2):
        for trial in ("a", "b", "c"):
            saved.record(trial, {"training_iteration": epoch, "time_this_iter_s": 3.0})
    saved.ended("a", {"training_iteration": 2, "acc": 0.4})
    ledger = Ledger(("gpu_hours", 1.0), min_epochs=2, max_epochs=4, gpu=0.5, num_trials=10, metric="acc", mode="max")
    ledger.load(saved.state())
    ledger.add_lost([{"epochs": 4, "seconds": 14.0, "ended": True, "value": 0.9},
                     {"epochs": 2, "seconds": None, "ended": False, "value": None}])
    assert ledger.epochs == 12 and ledger.done == 2 and ledger.best == 0.9
    assert ledger.epoch_seconds == pytest.approx(18 + 14 + 2 * 32 / 10)  # the mean epoch, then
    assert ledger.spent() == pytest.approx(0.5 * ledger.epoch_seconds / 3600)


def test_a_wall_budget_stops_every_trial_at_the_deadline():
    now = [0.0]
    ledger = Ledger(("wall_s", 10.0), min_epochs=3, max_epochs=5, gpu=0.0, num_trials=8, metric="acc",
                    mode="max", clock=lambda: now[0])
    assert ledger.can_start() == START
    ledger.started("a")
    assert ledger.can_start() == WAIT  # no epoch measured yet: one trial at a time
    now[0] = 2.0
    ledger.record("a", {"training_iteration": 1, "time_this_iter_s": 2.0})
    assert ledger.may_continue("a") and ledger.can_start() == START  # 8 s left pays 3 epochs of 2 s
    ledger.started("b")
    now[0] = 10.5
    ledger.record("a", {"training_iteration": 2, "time_this_iter_s": 2.0})
    assert not ledger.may_continue("a")  # inside its first rung, but past the deadline
    ledger.ended("a", None)
    assert ledger.can_start() == WAIT  # b still runs
    ledger.ended("b", None)
    assert ledger.can_start() == FINISHED
    snap = ledger.snapshot(finished=True)
    assert snap["budget"]["remaining"] == 0 and snap["budget"]["exhausted"] and snap["elapsed_s"] == 10.5


def test_the_progress_line_is_found_in_logs_and_reads_as_one_line():
    ledger = Ledger(("trial_epochs", 20), min_epochs=1, max_epochs=3, gpu=0.0, num_trials=4, metric="acc",
                    mode="max")
    ledger.can_start()
    ledger.started("a")
    ledger.record("a", {"training_iteration": 3, "time_this_iter_s": 1.0})
    ledger.ended("a", {"training_iteration": 3, "acc": 0.75})
    line = "lrsearch-progress " + json.dumps(ledger.snapshot())
    logs = f"starting\n{line}\nsome other output\nlrsearch-progress {{\"cut sh"  # the last one cut short
    progress = last_progress(logs)
    assert progress["trials_done"] == 1 and progress["best"] == 0.75 and progress["forecast_end"]
    assert progress["budget"] == {"kind": "trial_epochs", "limit": 20, "spent": 3, "remaining": 17,
                                  "exhausted": False}
    text = progress_text(progress)
    assert "1/4 done" in text and "acc 0.7500" in text and "3 trial-epochs of 20 trial-epochs spent, 17 trial-epochs left" in text
    assert "ends ~" in text
    assert last_progress("no progress here\n") is None


# --------------------------------------------------------------------------------------------
# real searches
# --------------------------------------------------------------------------------------------


def test_a_trial_epoch_budget_stops_the_search_and_a_resume_with_more_goes_on(gpu_ray, tmp_path):
    job = _job(tmp_path, "epochs", budget={"trial_epochs": 9})
    first = run_search(job, show_progress=False)
    epochs = sum(t.stopped_at_epoch for t in first.trials)
    assert epochs <= 9 and 9 - epochs < 2  # spent, not stopped early: a 2-epoch rung no longer fit
    assert first.counts["total"] < 12 and first.counts["errored"] == 0
    # every trial that started was paid for: it reached ASHA's first rung (2 epochs)
    assert all(t.stopped_at_epoch >= 2 for t in first.trials if t.state.value != "diverged"), first.trials
    summary = json.loads(Path(first.paths["summary"]).read_text())
    assert summary["budget"] == {"kind": "trial_epochs", "limit": 9, "spent": epochs, "remaining": 9 - epochs,
                                 "exhausted": True}
    assert summary["progress"]["trials_done"] == first.counts["total"] and summary["progress"]["forecast_end"]
    best = yaml.safe_load(Path(first.paths["best_config"]).read_text())
    assert best["value"] == first.best_metric == summary["progress"]["best"]
    parent = _parent(tmp_path, "epochs")
    assert parent.info.status == "FINISHED" and parent.data.tags["lrsearch.state"] == "finished"
    assert parent.data.tags["lrsearch.budget"] == "trial_epochs=9"
    assert parent.data.metrics["budget.spent"] == epochs and parent.data.metrics["budget.remaining"] == 9 - epochs

    more = _job(tmp_path, "epochs", budget={"trial_epochs": 16})
    second = run_search(more, resume=True, show_progress=False)
    assert {t.trial_id for t in first.trials} < {t.trial_id for t in second.trials}  # kept, and more
    total = sum(t.stopped_at_epoch for t in second.trials)
    assert epochs < total <= 16 and 16 - total < 2
    assert second.progress["budget"]["spent"] == total  # counted across the resume, each epoch once
    assert all(t.stopped_at_epoch >= 2 for t in second.trials if t.state.value != "diverged")
    assert Path(second.paths["best_config"]).is_file()
    again = _parent(tmp_path, "epochs")
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["lrsearch.budget"] == "trial_epochs=16" and again.data.metrics["budget.spent"] == total
    assert again.data.tags["best.trial_id"] == second.best.trial_id  # the best found after the resume


def test_a_gpu_hour_budget_counts_gpus_times_seconds(gpu_ray, tmp_path):
    # half a GPU per trial, two trials side by side on the one logical GPU; longer epochs
    budget = 0.005  # 18 GPU-seconds: 36 trial-seconds, a worker's startup included
    job = _job(tmp_path, "gpuh", task={"num_train": 2048}, resources={"cpu": 1, "gpu": 0.5},
               num_trials=1000, max_epochs=4, reduction_factor=2, budget={"gpu_hours": budget})
    result = run_search(job, show_progress=False)
    seconds = sum(t.wall_seconds for t in result.trials)
    spent = result.progress["budget"]["spent"]
    assert spent == pytest.approx(0.5 * seconds / 3600, rel=1e-3)  # resources.gpu x the trials' seconds
    # far more trials asked than the budget pays for, however fast the machine: the budget ends it
    assert result.counts["total"] < 1000 and result.progress["budget"]["exhausted"]
    assert all(t.stopped_at_epoch >= 2 for t in result.trials if t.state.value != "diverged"), result.trials
    # a forecast can be wrong by what the epochs promised at the end took beyond their forecast:
    # at most 2 trials x 2 epochs, each no longer than the slowest whole trial (one epoch can take
    # more than its trial's mean on a loaded machine). Trial 0 also carries the worker's startup: it
    # is left out of the bound unless it is the only trial (on a loaded machine it can use the budget up)
    slowest = max(t.wall_seconds for t in result.trials[1:] or result.trials)
    assert spent <= budget + 2 * 2 * 0.5 * slowest / 3600, (spent, slowest)
    assert Path(result.paths["best_config"]).is_file()
    parent = _parent(tmp_path, "gpuh")
    assert parent.info.status == "FINISHED" and parent.data.tags["lrsearch.budget"] == f"gpu_hours={budget:g}"
    assert parent.data.metrics["progress.gpu_hours"] == pytest.approx(spent, rel=1e-3)
