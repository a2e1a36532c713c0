"""`lrsearch train` / `lrsearch.train`: the final run, for real, on a local Ray with MLflow on sqlite.

A search runs once for the module; the final runs train its configs at longer horizons, on more
data, the top-k, a user's python task, after a kill; bad input fails before anything trains.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from conftest import joined, mlflow_uri
from mlflow import MlflowClient
from typer.testing import CliRunner

import lrsearch
from lrsearch.cli import app
from lrsearch.errors import ConfigError, SearchError, TrackingError
from lrsearch.job.space import SpaceSampler, schedule_params
from lrsearch.optim.schedules import lr_curve
from lrsearch.tasks import Task, build_task, synthetic_task

LRSEARCH = str(Path(sys.executable).with_name("lrsearch"))
TASK = {"kind": "synthetic", "num_train": 512, "num_val": 256, "num_test": 512, "batch_size": 64,
        "noise": 3.0}


def _job(tmp: Path, name: str, **overrides) -> dict:
    job = {"name": name, "task": dict(TASK),
           "range_test": {"num_steps": 20},
           "search": {"num_trials": 4, "max_epochs": 2, "max_concurrent_trials": 2},
           "storage": {"path": str(tmp / "runs")},
           "tracking": {"uri": mlflow_uri(tmp), "experiment": name}}
    for key, value in overrides.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


@pytest.fixture(scope="module")
def searched(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("final")
    job = _job(tmp, "fin")
    result = lrsearch.search(job)
    assert result.best is not None and result.counts["completed"] >= 2
    return {"tmp": tmp, "job": job, "result": result, "uri": mlflow_uri(tmp)}


def _load(tracking_uri: str, model_uri: str, dst: Path) -> torch.nn.Module:
    mlflow.set_tracking_uri(tracking_uri)
    dst.mkdir(parents=True, exist_ok=True)
    return mlflow.pytorch.load_model(model_uri, dst_path=str(dst))


def _accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    return hits / sum(len(y) for _, y in loader)


def test_the_best_config_trained_at_the_users_horizon_on_more_data(searched):
    # the job's latest search (the default source), 4 epochs, twice the training data: 4x the
    # search's 16 steps, so lr_scales="auto" trains the best config at 1x, 0.5x and 0.25x its max_lr
    job = _job(searched["tmp"], "fin", task={"num_train": 1024})
    final = lrsearch.train(job, epochs=4)
    best = searched["result"].best
    assert final.lr_scales == [1.0, 0.5, 0.25] and final.halving is False  # each the whole horizon below 8x
    assert [c["trial_id"] for c in final.candidates] == [best.trial_id, f"{best.trial_id}@0.5x",
                                                         f"{best.trial_id}@0.25x"]
    assert any(n.startswith("lr_scales auto: 64 steps is 4.0x the 16") for n in final.notes), final.notes
    pick = max(range(3), key=lambda i: final.candidates[i]["val_metric"])
    assert final.trial_id == final.candidates[pick]["trial_id"]
    assert final.config == {**best.search_config, "max_lr": best.search_config["max_lr"] * (1, 0.5, 0.25)[pick]}
    assert (final.epochs, final.steps_per_epoch, final.total_steps) == (4, 16, 64)  # the search: 8 a epoch
    assert final.search_run_id == searched["result"].tracking["run_id"]
    assert 0.0 <= final.test_metric <= 1.0 and final.val_metric > 0.5

    client = MlflowClient(searched["uri"])
    run = client.get_run(final.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == final.search_run_id  # linked to the search
    assert run.data.tags["lrsearch.role"] == "final"
    assert run.data.metrics["test_accuracy"] == pytest.approx(final.test_metric)
    assert run.data.params["total_steps"] == "64" and run.data.params["train.max_grad_norm"] == "1.0"
    assert run.data.params["lr_scales"] == "1,0.5,0.25"

    # the schedule was resolved for the 64-step horizon, as the export resolves it for users
    config, total = final.config, 64
    expected = lr_curve(config["schedule"], total, config["max_lr"], **schedule_params(config, total))
    logged = sorted(client.get_metric_history(final.run_id, f"top{pick + 1}.lr_step"), key=lambda m: m.step)
    assert [m.step for m in logged] == list(range(total))
    assert [m.value for m in logged] == pytest.approx(expected, rel=1e-9, abs=1e-15)

    # the logged model is the one scored: its accuracy on the task's test split is test_metric
    model = _load(searched["uri"], final.model_uri, searched["tmp"] / "dl1")
    test_loader = build_task(lrsearch.load_job(job)).test_loader
    assert _accuracy(model, test_loader) == pytest.approx(final.test_metric)

    # the final run's export is the config it kept (0.5x or 0.25x included), found at its horizon;
    # trained again at that horizon, "auto" leaves it at 1x: it was already chosen there
    exported = yaml.safe_load(lrsearch.export(run_id=final.run_id, tracking_uri=searched["uri"]).text)
    assert (exported["schedule"], exported["max_lr"], exported["trial_id"]) == (
        final.config["schedule"], final.config["max_lr"], final.trial_id)
    assert exported["search_horizon"]["total_steps"] == 64 and exported["value"] == final.val_metric
    on_disk = yaml.safe_load(Path(final.paths["best_config"]).read_text())
    assert (on_disk["max_lr"], on_disk["trial_id"]) == (final.config["max_lr"], final.trial_id)
    # the search's export names the final run when that kept another config than the search's best
    note = lrsearch.export(experiment="fin", tracking_uri=searched["uri"]).note or ""
    assert (f"--run-id {final.run_id}" in note) == (final.config["max_lr"] != best.max_lr), note
    again = lrsearch.train(job, search=exported, epochs=4, track=False)
    assert again.lr_scales == [1.0] and again.config["max_lr"] == final.config["max_lr"]


def test_top_k_keeps_the_best_by_validation_and_registers_it(searched):
    job, result = searched["job"], searched["result"]
    final = lrsearch.train(job, result, steps=20, top_k=3, register="fin-model")
    assert final.lr_scales == [1.0]  # "auto": 20 steps is under 4x the search's 16, so each config at 1x
    completed = [t.trial_id for t in lrsearch.output.results.ranked_completed(result.trials, result.mode)]
    assert [c["trial_id"] for c in final.candidates] == completed[:3]
    assert (final.total_steps, final.epochs) == (20, 3)  # 8 steps an epoch; the last one 4
    best = max(final.candidates, key=lambda c: c["val_metric"])
    assert final.trial_id == best["trial_id"] and final.val_metric == best["val_metric"]

    client = MlflowClient(searched["uri"])
    assert final.registered == {"name": "fin-model", "version": "1", "uri": "models:/fin-model/1"}
    version = client.get_model_version("fin-model", "1")
    assert version.tags["search_run_id"] == result.tracking["run_id"]
    assert json.loads(version.tags["config"]) == final.config
    assert version.tags["trial_id"] == final.trial_id
    metrics = client.get_run(final.run_id).data.metrics
    for i in range(1, len(final.candidates) + 1):
        assert f"top{i}.val_accuracy" in metrics
    model = _load(searched["uri"], "models:/fin-model/1", searched["tmp"] / "dl2")
    assert isinstance(model, torch.nn.Module)


def test_lr_scales_carry_the_best_config_down_and_keep_the_best_by_validation(searched):
    # the horizon bridge: the best config at 1x, 0.5x and 0.25x its max_lr, each at the horizon
    job, result = searched["job"], searched["result"]
    final = lrsearch.train(job, result, steps=16, lr_scales=(1, 0.5, 0.25))
    best = result.best
    ids = [c["trial_id"] for c in final.candidates]
    assert ids == [best.trial_id, f"{best.trial_id}@0.5x", f"{best.trial_id}@0.25x"]
    pick = max(final.candidates, key=lambda c: c["val_metric"])
    assert final.trial_id == pick["trial_id"] and final.val_metric == pick["val_metric"]
    scale = {ids[0]: 1.0, ids[1]: 0.5, ids[2]: 0.25}[final.trial_id]
    assert final.config == {**best.search_config, "max_lr": best.search_config["max_lr"] * scale}

    # each one trained at its own LR: the same schedule, scaled, step by step
    client = MlflowClient(searched["uri"])
    curves = [[m.value for m in sorted(client.get_metric_history(final.run_id, f"top{i}.lr_step"),
                                       key=lambda m: m.step)] for i in (1, 2, 3)]
    assert len(curves[0]) == 16
    assert curves[1] == pytest.approx([0.5 * x for x in curves[0]], rel=1e-9)
    assert curves[2] == pytest.approx([0.25 * x for x in curves[0]], rel=1e-9)
    assert client.get_run(final.run_id).data.params["lr_scales"] == "1,0.5,0.25"


def test_halving_starts_every_config_and_finishes_the_best_at_a_quarter_of_the_horizon(searched):
    # successive halving at the horizon: 3 configs to epoch 1 of 4, scored by a cooldown branch, one goes on
    job, result = searched["job"], searched["result"]
    final = lrsearch.train(job, result, epochs=4, lr_scales=(4, 1, 0.25), halving=True)
    per_epoch = final.steps_per_epoch
    assert final.epochs == 4 and per_epoch == 8
    finished = [c for c in final.candidates if c["epochs"] == 4 and not c["diverged"]]
    halved = [c for c in final.candidates if c["epochs"] == 1]
    assert len(finished) == 1 and len(halved) == 2 and final.trial_id == finished[0]["trial_id"]
    rung = {c["trial_id"]: c["rung_scores"]["1"] for c in final.candidates}
    assert rung[final.trial_id] == max(rung.values())  # the best cooldown score went on
    assert all(c["val_metric"] == rung[c["trial_id"]] for c in halved)  # a diverged one: the worst score
    # 3 x epoch 1, a cooldown branch of 20 % of 8 steps for each that did not diverge, 3 epochs more for one
    branches = sum(not c["diverged"] for c in final.candidates)
    assert final.steps_trained == 3 * per_epoch + 2 * branches + 3 * per_epoch

    client = MlflowClient(searched["uri"])
    run = client.get_run(final.run_id)
    assert run.data.params["halving"] == "True"
    for i in (1, 2, 3):
        assert [m.step for m in client.get_metric_history(final.run_id, f"top{i}.halving_val_accuracy")] == [1]
    # the one that went on is the run it would have been alone: its schedule over all 32 steps, unbroken
    i = [c["trial_id"] for c in final.candidates].index(final.trial_id) + 1
    lrs = [m.value for m in sorted(client.get_metric_history(final.run_id, f"top{i}.lr_step"), key=lambda m: m.step)]
    alone = lrsearch.train(job, {"max_lr": final.config["max_lr"], "schedule": final.config["schedule"],
                                 "params": final.config.get(final.config["schedule"]) or {}},
                           epochs=4, lr_scales=(1,), track=False)
    assert lrs == pytest.approx(lr_curve(final.config["schedule"], 4 * per_epoch, final.config["max_lr"],
                                         **schedule_params(final.config, 4 * per_epoch)), rel=1e-9)
    assert alone.val_metric == pytest.approx(final.val_metric, abs=1e-6)
    assert alone.test_metric == pytest.approx(final.test_metric, abs=1e-6)


def test_from_8x_the_searched_steps_auto_halves_the_scaled_configs(searched):
    # 8 epochs of 16 steps: 8x the search's 16 steps, so "auto" starts 1x, 0.5x and 0.25x together and
    # keeps one at a quarter of the horizon (epoch 2) by its cooldown branch
    job = _job(searched["tmp"], "fin", task={"num_train": 1024})
    final = lrsearch.train(job, searched["result"], epochs=8)
    assert final.lr_scales == [1.0, 0.5, 0.25] and final.halving is True and final.total_steps == 128
    assert any(n.startswith("lr_scales auto: 128 steps is 8.0x the 16") and "a quarter of the run" in n
               for n in final.notes), final.notes
    assert sorted(c["epochs"] for c in final.candidates) == [2, 2, 8] or any(c["diverged"] for c in final.candidates)
    assert final.steps_trained < 2 * final.total_steps  # 1.3 runs and the branches, not 3 runs
    assert MlflowClient(searched["uri"]).get_run(final.run_id).data.params["halving"] == "True"


def test_range_test_trains_once_at_the_lr_of_a_range_test_a_quarter_of_the_run_long(searched):
    # no search: 8 epochs of 16 steps; a quarter of the run is 32 steps, but the sweep over
    # 1e-7..10 takes at least 12.5 steps a decade: 100 steps on the run's own task give max_lr
    job = {**_job(searched["tmp"], "rtest", task={"num_train": 1024}), "range_test": {"num_steps": "auto"}}
    with pytest.raises(ConfigError, match="--range-test: trains without a search"):
        lrsearch.train(job, searched["result"], epochs=8, range_test=True)
    final = lrsearch.train(job, epochs=8, range_test=True)
    rt = final.range_test
    assert rt["steps"] == 100 and 2 <= rt["steps_run"] <= 100 and rt["low"] < rt["max_lr"] <= rt["high"]
    assert [c["trial_id"] for c in final.candidates] == ["range_test"] and final.trial_id == "range_test"
    assert final.lr_scales == [1.0] and final.halving is False and final.total_steps == 128
    assert final.config["max_lr"] == rt["max_lr"]
    # the consensus of the suggestions it recorded: their geometric mean, within its bounds
    found = [v for v in rt["suggestions"].values() if v]
    mean = math.exp(sum(math.log(v) for v in found) / len(found)) if found else math.sqrt(rt["low"] * rt["high"])
    assert rt["max_lr"] == pytest.approx(min(max(mean, rt["low"]), rt["high"]), rel=1e-12)
    # the space's default schedule at the middle of its ranges: its first trial's config
    space = lrsearch.load_job(job).search_space()
    first = SpaceSampler(space).first_point(rt["max_lr"])
    assert final.config["schedule"] == first["schedule"] == space.default_schedule
    assert final.config[first["schedule"]] == {k.split("/")[1]: v for k, v in first.items() if "/" in k}
    assert any(n.startswith("range test: 100 steps (12.5 a decade of its sweep; a quarter of the run is 32)")
               for n in final.notes), final.notes
    params = MlflowClient(searched["uri"]).get_run(final.run_id).data.params
    assert params["range_test.steps"] == "100" and float(params["range_test.max_lr"]) == rt["max_lr"]
    # the same range test as lrsearch.find_lr's with those steps, on that task
    again = lrsearch.find_lr({**job, "range_test": {"num_steps": 100}}, save=False)
    assert len(again.lrs) == rt["steps_run"] and again.consensus() == pytest.approx(rt["max_lr"], rel=1e-3)
    # the job's own range_test.num_steps, where it gives a number, sets the sweep instead
    given = lrsearch.train({**job, "name": "rtest-given", "range_test": {"num_steps": 24}}, epochs=2, range_test=True)
    assert given.range_test["steps"] == 24 and given.total_steps == 32
    assert any(n.startswith("range test: 24 steps (range_test.num_steps)") for n in given.notes), given.notes


def test_range_test_steps_are_a_quarter_of_the_run_at_least_12_5_a_decade_unless_the_job_gives_them():
    from lrsearch.final.worker import MIN_RANGE_TEST_STEPS, range_test_steps

    assert range_test_steps("auto", 0.25, 128, 1e-7, 10.0) == 100  # 12.5 a decade over 8 decades
    assert range_test_steps("auto", 0.25, 1200, 1e-7, 10.0) == 300  # a quarter of the run
    assert range_test_steps("auto", 0.25, 128, 1e-4, 1e-2) == 32  # 2 decades: 25 steps; a quarter: 32
    assert range_test_steps("auto", 0.25, 40, 1e-3, 1e-2) == MIN_RANGE_TEST_STEPS == 20
    assert range_test_steps(24, 0.25, 1200, 1e-7, 10.0) == 24  # the job's own number wins


def test_auto_halves_only_auto_scales_from_8x_and_an_explicit_choice_wins():
    from lrsearch.final.found import AUTO_SCALES, resolve_scales

    best = {"search_horizon": {"total_steps": 16}}
    for steps, asked, expected in ((20, None, ((1.0,), False)), (64, None, (AUTO_SCALES, False)),
                                   (127, None, (AUTO_SCALES, False)), (128, None, (AUTO_SCALES, True)),
                                   (128, False, (AUTO_SCALES, False)), (64, True, (AUTO_SCALES, True))):
        assert resolve_scales("auto", steps, best, [], asked) == expected, (steps, asked)
    # scales given: halved only when asked; no searched horizon (a hand-written config): one run
    assert resolve_scales((1, 0.5), 512, best, [], None) == ((1.0, 0.5), False)
    assert resolve_scales((1, 0.5), 512, best, [], True) == ((1.0, 0.5), True)
    assert resolve_scales("auto", 512, {}, [], None) == ((1.0,), False)


def test_halving_rungs_sit_at_a_quarter_of_the_horizon_and_halve_to_one():
    from lrsearch.final.worker import halving_rungs

    assert halving_rungs(3, 3) == [(1, 1)]
    assert halving_rungs(3, 12) == [(3, 1)]
    assert halving_rungs(4, 16) == [(2, 2), (4, 1)]
    assert halving_rungs(8, 32) == [(2, 4), (4, 2), (8, 1)]
    assert halving_rungs(4, 2) == [(1, 2), (1, 1)]  # short horizons: both at the first epoch
    assert halving_rungs(1, 10) == [] and halving_rungs(3, 1) == []


def test_a_cooldown_takes_the_lr_linearly_to_zero():
    from lrsearch.engine import LinearCooldown

    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5}])
    cooldown, seen = LinearCooldown(opt, 4), []
    for _ in range(4):
        cooldown.step()
        seen.append([g["lr"] for g in opt.param_groups])
    assert seen == [[0.75, 0.375], [0.5, 0.25], [0.25, 0.125], [0.0, 0.0]]


def _digits_task(with_test: bool) -> Task:
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples" / "python_task"))
    from my_task import build

    task = build(num_val=300, num_test=300)
    if not with_test:
        task.test_loader = None
    return task


def test_a_python_task_with_a_test_loader_is_scored_on_it(searched, tmp_path):
    job = _job(tmp_path, "digits", task=None, search={"num_trials": 2, "max_epochs": 1})
    job["task"] = {"kind": "python", "entrypoint": "my_task:build",
                   "path": str(Path(__file__).parents[2] / "examples" / "python_task"),
                   "options": {"num_val": 300, "num_test": 300}}
    result = lrsearch.search(job)
    final = lrsearch.train(job, result, epochs=2)
    assert final.test_metric is not None
    assert final.lr_scales == [1.0]  # "auto" at 2x the search's steps: one run (the bridge starts at 4x)
    model = _load(f"sqlite:///{tmp_path}/mlruns.db", final.model_uri, tmp_path / "dl")
    assert _accuracy(model, _digits_task(True).test_loader) == pytest.approx(final.test_metric)
    # the same task without a test split: trained and logged, no test score, and it says so
    untested = lrsearch.train(job, result, epochs=1, task=lambda: _digits_task(False))
    assert untested.test_metric is None and untested.val_metric > 0


def test_bad_input_is_one_clear_error_before_anything_trains(searched, tmp_path):
    job, result = searched["job"], searched["result"]
    out = Path(job["storage"]["path"]) / "fin" / "final"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else []
    cases = [
        ({"epochs": 0}, ConfigError, "--epochs: got 0; allowed: an integer >= 1"),
        ({"steps": -5}, ConfigError, "--steps: got -5; allowed: an integer >= 1"),
        ({"epochs": 2, "steps": 10}, ConfigError, "give at most one of --epochs and --steps"),
        ({"top_k": 0}, ConfigError, "--top-k: got 0; allowed: an integer >= 1"),
        ({"lr_scales": (1, 0)}, ConfigError, "--lr-scales: got 1,0; allowed: 'auto', or distinct numbers > 0"),
        ({"lr_scales": (1, 1)}, ConfigError, "--lr-scales: got 1,1; allowed: 'auto', or distinct numbers > 0"),
        ({"lr_scales": ()}, ConfigError, "--lr-scales: got (); allowed"),
        ({"search": "no-such-experiment"}, TrackingError, "no experiment 'no-such-experiment'"),
        ({"search": "0" * 32}, TrackingError, f"--run-id: no run {'0' * 32!r}"),
    ]
    for kwargs, error, fragment in cases:
        with pytest.raises(error, match=re.escape(fragment)):
            lrsearch.train(job, kwargs.pop("search", result), **kwargs)
    # found where the task is built (the Ray worker): the same one line, not a remote traceback
    greedy = {**job, "train": {"gradient_accumulation_steps": 100}}
    with pytest.raises(ConfigError) as err:
        lrsearch.train(greedy, result)
    assert str(err.value) == ("train.gradient_accumulation_steps: got 100; the train loader has 8 batches "
                              "per epoch, so at most 8 is allowed")
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else []) == before  # nothing ran


def test_a_search_with_no_completed_trial_has_nothing_to_train(searched, tmp_path):
    # SGD at LRs of 1e3 and more: every trial diverges at once
    job = _job(tmp_path, "blowup", optimizer={"name": "sgd"}, range_test={"enabled": False},
               space={"max_lr": {"low": 1e3, "high": 1e4}, "schedules": ["constant"]},
               train={"max_grad_norm": None},
               search={"num_trials": 2, "max_epochs": 1, "early_stopping": "none"})
    job["range_test"] = {"enabled": False}
    result = lrsearch.search(job)
    assert result.best is None and result.counts["diverged"] == 2
    with pytest.raises(SearchError, match="has no completed trial: nothing to train"):
        lrsearch.train(job)  # from MLflow: the job's latest search
    with pytest.raises(SearchError, match="no completed trial: nothing to train"):
        lrsearch.train(job, result)


def test_cli_errors_are_one_line_with_exit_code_2(searched):
    job_file = searched["tmp"] / "fin.yaml"
    job_file.write_text(yaml.safe_dump(searched["job"]))
    bad_config = searched["tmp"] / "bad_config.yaml"
    bad_config.write_text("max_lr: -1\nschedule: wsd\n")
    for args, fragment in ((["--epochs", "0"], "--epochs: got 0"),
                           (["--experiment", "nope"], "no experiment 'nope'"),
                           (["--lr-scales", "1,half"], "--lr-scales: got '1,half'; allowed: auto, or comma-separated"),
                           (["--lr-scales", "1,-0.5"], "--lr-scales: got 1,-0.5; allowed: 'auto', or distinct"),
                           (["--config", str(bad_config)], "search: max_lr=-1; allowed: a number > 0"),
                           (["--config", "nope.yaml", "--run-id", "x"], "give at most one of"),
                           (["--range-test", "--experiment", "fin"], "--range-test: trains without a search")):
        # in this process (the console script's own start is tested by tests/test_packaging.py)
        done = CliRunner().invoke(app, ["train", str(job_file), *args])
        assert done.exit_code == 2, done.stderr
        assert fragment in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert "--range-test" not in args or not done.stdout  # refused before the header is printed


# --------------------------------------------------------------------------------------------
# resume after a kill
# --------------------------------------------------------------------------------------------


def test_killed_final_run_resumes_from_its_last_epoch(local_ray, tmp_path):
    # epochs of about a second here: the driver is killed once the first epoch's checkpoint exists;
    # a given config (what resumes is the same for a search's best), at 1x
    job = _job(tmp_path, "killed", task={"num_train": 4096, "hidden": 512, "num_features": 128})
    config = {"max_lr": 3e-3, "schedule": "cosine", "params": {"warmup_frac": 0.1}}
    job_file, config_file = tmp_path / "killed.yaml", tmp_path / "config.yaml"
    job_file.write_text(yaml.safe_dump(job))
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "runs" / "killed" / "final"
    ckpt = out / "config.pt"
    given = ["--config", str(config_file), "--epochs", "6", "--lr-scales", "1", "--json"]

    proc = subprocess.Popen([LRSEARCH, "train", str(job_file), *given],
                            cwd=tmp_path, env=joined(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ckpt.is_file():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no epoch checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as the OOM killer does
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything else left in its session
        except ProcessLookupError:
            pass
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    run_id = json.loads((out / "state.json").read_text())["run_id"]
    assert 1 <= killed_at < 6

    done = subprocess.run([LRSEARCH, "train", str(job_file), *given, "--resume"],
                          cwd=tmp_path, env=joined(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads(done.stdout)
    assert {"test_metric", "val_metric", "run_id", "model_uri"} <= set(resumed)
    assert resumed["run_id"] == run_id and resumed["resumed_from_epoch"] >= killed_at
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    finals = client.search_runs([client.get_experiment_by_name("killed").experiment_id],
                                filter_string="tags.`lrsearch.role` = 'final'")
    assert [r.info.run_id for r in finals] == [run_id] and finals[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_accuracy")]
    assert sorted(steps) == list(range(1, 7))  # every epoch once, none lost, none twice

    # the same run uninterrupted ends where the resumed one did (each epoch seeded, state restored)
    straight = lrsearch.train(job, search=config, epochs=6, lr_scales=(1,), track=False)
    assert straight.val_metric == resumed["val_metric"] and straight.test_metric == resumed["test_metric"]


def test_train_without_a_test_split_in_the_task_section(local_ray, tmp_path):
    job = _job(tmp_path, "notest", task={"num_test": 0})
    final = lrsearch.train(job, search={"max_lr": 5e-3, "schedule": "linear"}, epochs=1, track=False)
    assert final.test_metric is None and final.run_id is None and final.model_uri is None
    assert synthetic_task(num_test=0).test_loader is None


def test_the_recipe_reaches_the_range_test_the_trials_the_best_config_and_the_final_run(searched, tmp_path):
    recipe = {"max_grad_norm": 0.5, "precision": "bf16", "gradient_accumulation_steps": 2}
    job = _job(tmp_path, "recipe", train=recipe, search={"num_trials": 2, "max_epochs": 1})
    result = lrsearch.search(job)
    assert result.steps_per_epoch == 4  # 8 batches, 2 a step
    settings = result.range_test
    assert settings["settings"]["precision"] == "bf16" and settings["settings"]["max_grad_norm"] == 0.5
    assert settings["settings"]["accumulation_steps"] == 2
    assert result.best.train == recipe and result.best.search_horizon["total_steps"] == 4
    kwargs = json.loads(lrsearch.export(result, format="hf").text)
    assert (kwargs["max_grad_norm"], kwargs["bf16"], kwargs["gradient_accumulation_steps"]) == (0.5, True, 2)
    final = lrsearch.train(job, result, epochs=2)
    assert (final.steps_per_epoch, final.total_steps) == (4, 8)
    params = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(final.run_id).data.params
    assert (params["train.precision"], params["train.gradient_accumulation_steps"]) == ("bf16", "2")


def test_a_given_config_trains_without_a_search(local_ray, tmp_path):
    # a config a user already has (the HF default here), trained and tested at the horizon
    job = _job(tmp_path, "given", task={"num_train": 256})
    config = {"max_lr": 5e-3, "schedule": "wsd", "params": {"decay_frac": 0.3, "decay_type": "cosine"}}
    final = lrsearch.train(job, search=config, epochs=2, track=False)
    assert final.trial_id == "config" and final.config["wsd"] == config["params"]
    # the CLI: the same config from a file (an exported best_config.yaml works the same)
    job_file, config_file = tmp_path / "given.yaml", tmp_path / "config.yaml"
    job_file.write_text(yaml.safe_dump(job))
    config_file.write_text(yaml.safe_dump(config))
    done = subprocess.run([LRSEARCH, "train", str(job_file), "--config", str(config_file), "--epochs", "2",
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"] == final.config
    assert final.total_steps == 8 and final.val_metric > 0.5 and final.test_metric is not None
    bad = [({"schedule": "linear"}, "no max_lr"),
           ({"max_lr": -1, "schedule": "linear"}, "max_lr=-1; allowed: a number > 0"),
           ({"max_lr": 1e-3, "schedule": "wsd", "params": {"decay_type": "fast"}}, "decay_type='fast'"),
           ({"max_lr": 1e-3, "schedule": "linear", "params": [0.1]}, r"params=\[0.1\]; allowed: a mapping")]
    for given, fragment in bad:
        with pytest.raises(ConfigError, match=fragment):
            lrsearch.train(job, search=given, track=False)


def test_schedulefree_trains_and_ships_its_averaged_weights(local_ray, tmp_path):
    # optimizer.eval() before each evaluation and checkpoint: the test score and model.pt are the
    # average's, the checkpoint resumes into train mode (test_optim checks the exact resume)
    job = _job(tmp_path, "sf", optimizer={"name": "adamw_schedulefree", "weight_decay": 0.0})
    config = {"max_lr": 5e-3, "schedule": "constant", "params": {"warmup_frac": 0.05}}
    final = lrsearch.train(job, search=config, epochs=2, track=False)
    task = build_task(lrsearch.load_job(job))
    model = task.build_model()
    model.load_state_dict(torch.load(final.paths["model"], weights_only=True))
    assert _accuracy(model, task.test_loader) == pytest.approx(final.test_metric)
    assert final.val_metric > 0.5
    # the same run with plain AdamW's weights differs: the model really is the average
    plain = lrsearch.train({**job, "optimizer": {"name": "adamw", "weight_decay": 0.0}, "name": "sf2"},
                           search=config, epochs=2, track=False)
    assert plain.test_metric != final.test_metric or plain.val_metric != final.val_metric


def test_a_search_with_the_schedule_free_arm_starts_it_beside_the_range_tests_point(local_ray, tmp_path):
    from job.test_config import ARM_SPACE  # tests/job, on the path with tests/conftest.py

    (tmp_path / "arm.yaml").write_text(ARM_SPACE)  # linear and the arm, which a space opts into
    job = _job(tmp_path, "arm", space={"file": str(tmp_path / "arm.yaml")},
               search={"num_trials": 3, "max_epochs": 2})
    result = lrsearch.search(job, track=False)
    first, second = sorted(result.trials, key=lambda t: t.number)[:2]
    assert (first.schedule, second.schedule) == ("linear", "schedule_free")
    assert first.max_lr == second.max_lr and second.params == {"warmup_frac": 0.05}
    assert second.state.value in ("completed", "pruned") and second.metric_per_epoch[0] > 0.3
    # trained at the horizon with AdamWScheduleFree, as the trial was
    final = lrsearch.train(job, search={"max_lr": second.max_lr, "schedule": "schedule_free",
                                        "params": second.params}, epochs=2, track=False)
    assert final.val_metric > 0.5
