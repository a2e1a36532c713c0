"""The trial protocol (lrsearch.Trial) and lrsearch.search(job, train_fn=...): the user's own loop,
run for real as each trial on a local Ray with ASHA and MLflow."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import mlflow_uri
from protocol_checks import (
    assert_asha_stopped_some,
    assert_schedules,
    finish,
    kill_when,
    run_script,
    tune_saved,
)
from torch import nn
from torch.nn import functional as F

import lrsearch
from lrsearch.engine.protocol import Trial, TrialPlan, flat_config
from lrsearch.errors import ConfigError, TaskError
from lrsearch.job.space import schedule_params
from lrsearch.output.results import TrialState

STEPS = 8  # optimizer steps per epoch of the loop below


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    return x, y


def mlp_loop(trial: lrsearch.Trial) -> None:
    """A plain PyTorch loop, as a user writes it, on the protocol."""
    torch.manual_seed(0)
    x, y = _data()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = trial.optimizer(model)
    scheduler = trial.scheduler(optimizer, total_steps=STEPS * trial.max_epochs)
    for epoch in range(trial.start_epoch, trial.max_epochs):
        for i in range(STEPS):
            loss = F.cross_entropy(model(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        if trial.report(epoch + 1, accuracy=accuracy, train_loss=loss.item()):
            return


def _job(tmp_path, name, **search):
    return {
        "name": name,
        "space": {"family": "default", "schedules": ["cosine", "linear", "one_cycle"],
                  "max_lr": {"low": 1e-3, "high": 0.1}},
        "search": {"num_trials": 6, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2,
                   "max_concurrent_trials": 2, **search},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_uri(tmp_path), "experiment": name},
    }


@pytest.fixture(scope="module")
def searched(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_fn")
    return tmp, lrsearch.search(_job(tmp, "byo-loop"), train_fn=mlp_loop)


def test_a_train_fn_search_runs_the_users_loop_as_each_trial(searched):
    tmp, result = searched
    assert result.metric == "val_accuracy" and result.mode == "max"
    assert len(result.trials) == 6 and all(t.state is not TrialState.ERRORED for t in result.trials)
    assert result.range_test is None and any("range test: off" in n for n in result.notes)
    best = result.best
    assert best is not None and best.search_horizon["total_steps"] == STEPS * 4
    assert best.value == max(t.metric_per_epoch[-1] for t in result.trials if t.state is TrialState.COMPLETED)
    assert best.value > 0.5  # the loop learnt


def test_each_trials_lr_at_every_step_is_its_schedules(searched):
    tmp, result = searched
    assert_schedules(f"sqlite:///{tmp}/mlruns.db", result, STEPS)


def test_asha_stops_trials_of_the_users_loop(searched):
    assert_asha_stopped_some(searched[1])


def exploding_loop(trial: lrsearch.Trial) -> None:
    model = nn.Linear(4, 2)
    optimizer = trial.optimizer(model)
    trial.scheduler(optimizer, total_steps=trial.max_epochs)
    for epoch in range(trial.max_epochs):
        loss = float("nan") if trial.max_lr > 1e-3 else 1.0
        if trial.diverging(loss):
            trial.report(epoch + 1, diverged=True)
            return
        if trial.report(epoch + 1, accuracy=0.5, train_loss=loss):
            return


def test_a_diverging_user_loop_stops_its_trial_not_the_search(local_ray, tmp_path):
    job = _job(tmp_path, "explode", num_trials=2, max_epochs=2, early_stopping="none",
               start_points=[{"max_lr": 1e-2, "schedule": "linear"}, {"max_lr": 1e-4, "schedule": "linear"}])
    result = lrsearch.search(job, train_fn=exploding_loop, track=False)
    by_lr = {t.max_lr: t for t in result.trials}
    assert by_lr[1e-2].state is TrialState.DIVERGED and by_lr[1e-2].stopped_at_epoch == 1
    assert by_lr[1e-4].state is TrialState.COMPLETED and result.best.max_lr == 1e-4


def test_bad_train_fn_arguments_fail_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="train_fn: got int"):
        lrsearch.search(_job(tmp_path, "bad"), train_fn=3)
    with pytest.raises(ConfigError, match="mode: got 'up'"):
        lrsearch.search(_job(tmp_path, "bad"), train_fn=mlp_loop, mode="up")
    with pytest.raises(ConfigError, match="task: missing"):
        lrsearch.search(_job(tmp_path, "bad"))
    assert not (tmp_path / "runs").exists()


def _trial(**search) -> Trial:
    job = lrsearch.load_job({"name": "t", "search": {"max_epochs": 2, **search}})
    return Trial({"max_lr": 1e-3, "schedule": "cosine", "cosine": {"warmup_frac": 0.25}},
                 TrialPlan.of(job.train, job.optimizer, job.search),
                 metric="accuracy", device=torch.device("cpu"))


def test_a_trial_gives_the_config_flat_and_the_optimizer_over_groups():
    trial = _trial()
    assert trial.config == {"max_lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.25}
    assert flat_config({"max_lr": 1.0, "schedule": "linear"}) == {"max_lr": 1.0, "schedule": "linear"}
    body, head = nn.Linear(4, 4), nn.Linear(4, 2)
    opt = trial.optimizer([{"params": body.parameters(), "lr_scale": 0.1}, {"params": head.parameters()}],
                          model=nn.Sequential(body, head))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3])
    scheduler = trial.scheduler(opt, 8)
    assert trial.schedule_params == schedule_params(trial.raw_config, 8)
    assert opt.param_groups[1]["lr"] == 0.0 and scheduler.last_epoch == 0
    with pytest.raises(TaskError, match="total_steps got 0"):
        trial.scheduler(opt, 0)


def test_a_report_without_the_objective_names_it():
    trial = _trial()
    with pytest.raises(TaskError, match="the objective 'val_accuracy' is missing; reported: val_loss"):
        trial.report(1, loss=0.3)


DRIVER = """
import sys, time
import torch
from torch import nn
from torch.nn import functional as F
import lrsearch

def slow_loop(trial):
    with open({log!r}, "a") as f:
        f.write(f"{{trial.config['max_lr']}} {{trial.start_epoch}} {{int(trial.replaying(1))}}\\n")
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    optimizer = trial.optimizer(model)
    scheduler = trial.scheduler(optimizer, total_steps=4 * trial.max_epochs)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for epoch in range(trial.start_epoch, trial.max_epochs):
        for _ in range(4):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step(); scheduler.step()
        time.sleep(1.5)
        if trial.report(epoch + 1, accuracy=1 / (1 + loss.item()), train_loss=loss.item()):
            return

job = {job}
result = lrsearch.search(job, train_fn=slow_loop, resume="--resume" in sys.argv)
print("RESULT", sum(t.state.value == "completed" for t in result.trials), len(result.trials))
"""


def test_a_killed_train_fn_search_resumes_its_trials_from_their_checkpoints(tmp_path):
    job = _job(tmp_path, "byo-kill", num_trials=3, max_epochs=4, early_stopping="none", checkpoint="epoch",
               max_concurrent_trials=1)
    log = tmp_path / "starts.log"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER).format(log=str(log), job=json.dumps(job)))
    tune_dir = tmp_path / "runs" / "byo-kill" / "tune"
    kill_when(run_script(script), lambda: tune_saved(tune_dir, 3, "checkpoint_000001"),
              "the third trial's second checkpoint")
    text = finish(run_script(script, "--resume"))
    assert "RESULT 3 3" in text, text[-3000:]
    starts = [line.split() for line in log.read_text().splitlines()]
    # a trial went on from its checkpoint (or, where Tune's saved state named an older one, retrained
    # to it unreported)
    assert len(starts) == 4 and any(int(epoch) > 0 or int(replay) for _, epoch, replay in starts), starts
