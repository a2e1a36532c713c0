"""lrsearch.engine.trial: one epoch of training, the divergence stop, checkpoint restore and resume,
where a trial gets its task (TaskSource), the step budget and the trial's scheduler."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from ray import cloudpickle
from ray.tune import Checkpoint
from torch import nn

import lrsearch.engine.trial as train
from lrsearch.engine import epoch_seed, train_epoch
from lrsearch.engine.protocol import REPLAY_FILE, Trial, TrialPlan
from lrsearch.engine.trial import (
    TaskSource,
    build_run,
    steps_per_epoch,
    trial_horizon,
)
from lrsearch.errors import ConfigError, TaskError
from lrsearch.job.parse import parse_job
from lrsearch.job.space import schedule_params
from lrsearch.optim.divergence import DivergenceMonitor
from lrsearch.optim.recipe import Recipe, Stepper
from lrsearch.optim.schedules import build_scheduler, lr_curve
from lrsearch.tasks import Task, reseed, synthetic_task

CPU = torch.device("cpu")
TASK = {"kind": "synthetic", "num_train": 64, "num_val": 32}
#: the plain recipe these tests were written for: no clipping, fp32, one batch per step
PLAIN = Recipe(max_grad_norm=None)


def _epoch(model, optimizer, scheduler, task, monitor, max_steps, recipe=PLAIN):
    return train_epoch(Stepper(recipe, model, optimizer, task.criterion, CPU), scheduler, task, monitor,
                       max_steps)


def _horizon(job, task):
    return trial_horizon(task, job.train.gradient_accumulation_steps, job.search.max_steps_per_epoch,
                         job.search.max_epochs)


def total_steps(job, task) -> int:
    return _horizon(job, task).total_steps


def _trial(job, config, checkpoint=None) -> Trial:
    plan = TrialPlan.of(job.train, job.optimizer, job.search)
    return Trial(config, plan, metric="accuracy", checkpoint=checkpoint, device=CPU)


def _job(**search):
    return parse_job({"name": "t", "task": TASK, "search": search})


def _task(num_train: int = 64, batch_size: int = 8) -> Task:
    return synthetic_task(num_train=num_train, num_val=32, batch_size=batch_size)


class RecordingLoss:
    """Cross-entropy that remembers every loss it returned; from call ``nan_at`` on it returns NaN."""

    def __init__(self, nan_at: int | None = None):
        self.losses: list[float] = []
        self.nan_at = nan_at

    def __call__(self, outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets)
        if self.nan_at is not None and len(self.losses) >= self.nan_at:
            loss = loss * math.nan
        self.losses.append(float(loss.detach()))
        return loss


def _sgd_run(lr: float, *, criterion: RecordingLoss, schedule: str = "constant", total: int = 32,
             max_steps: int = 32, monitor: DivergenceMonitor | None = None, **params):
    task = _task(num_train=256)
    task.criterion = criterion
    reseed(task, 0)
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = build_scheduler(optimizer, schedule, total, **params)
    monitor = monitor or DivergenceMonitor(factor=4.0, smooth=0.1, reference="first")
    return model, monitor, _epoch(model, optimizer, scheduler, task, monitor, max_steps)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------
# train_epoch
# --------------------------------------------------------------------------------------------


def test_sane_lr_trains_max_steps_with_the_schedules_lrs():
    criterion = RecordingLoss()
    task = _task(num_train=256)  # 32 batches: max_steps, not the loader, ends the epoch
    task.criterion = criterion
    reseed(task, 0)
    model = task.build_model()
    before = _params(model)
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = build_scheduler(optimizer, "linear", 20, warmup_frac=0.5)
    monitor = DivergenceMonitor(factor=4.0, smooth=0.1, reference="first")

    loss, steps, diverged, lrs = _epoch(model, optimizer, scheduler, task, monitor, 12)

    assert (steps, diverged) == (12, False)
    assert lrs == lr_curve("linear", 20, 0.05, warmup_frac=0.5)[:12]
    assert lrs[:3] == pytest.approx([0.0, 0.005, 0.01], rel=1e-12)  # the warmup really is in there
    assert len(criterion.losses) == 12 and monitor.num_losses == 12
    assert math.isfinite(loss)
    assert loss == pytest.approx(sum(criterion.losses) / 12, rel=1e-12)
    assert model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_an_epoch_shorter_than_max_steps_ends_with_the_loader():
    criterion = RecordingLoss()
    task = _task(num_train=64, batch_size=16)  # 4 batches
    task.criterion = criterion
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, "constant", 100)
    monitor = DivergenceMonitor(reference="first")
    _, steps, diverged, lrs = _epoch(model, optimizer, scheduler, task, monitor, 100)
    assert (steps, diverged, lrs) == (4, False, [0.01] * 4)


@pytest.mark.parametrize("lr", [1e4, 2.0])
def test_absurd_lr_diverges_at_the_monitors_first_stop(lr):
    # factor 2, smooth 0.3: replaying the losses through a fresh, identical monitor must stop at
    # exactly the step train_epoch stopped at (the losses stay finite: the factor stops it)
    criterion = RecordingLoss()
    monitor = DivergenceMonitor(factor=2.0, smooth=0.3, reference="first")
    _, _, (loss, steps, diverged, lrs) = _sgd_run(lr, criterion=criterion, monitor=monitor)

    assert diverged and steps < 32
    assert all(math.isfinite(x) for x in criterion.losses)
    replay = DivergenceMonitor(factor=2.0, smooth=0.3, reference="first")
    stops = [i for i, x in enumerate(criterion.losses) if replay.update(x)]
    assert stops == [steps]  # the last loss recorded is the first that trips the monitor
    assert len(criterion.losses) == steps + 1
    assert replay.smoothed == monitor.smoothed
    assert replay.smoothed > 2.0 * criterion.losses[0]
    # the mean covers the steps taken, not the diverged one; the LR of the diverged step is listed
    assert loss == pytest.approx(sum(criterion.losses[:steps]) / max(1, steps), rel=1e-12)
    assert lrs == [lr] * (steps + 1)


def test_lr_2_diverges_after_a_few_steps_not_at_once():
    # the case above that exercises the smoothing: several steps pass before the stop
    criterion = RecordingLoss()
    monitor = DivergenceMonitor(factor=2.0, smooth=0.3, reference="first")
    _, _, (_, steps, diverged, _) = _sgd_run(2.0, criterion=criterion, monitor=monitor)
    assert diverged and 2 <= steps < 32
    # the raw loss crossed 2 x the first loss before the stop: the smoothing delayed it
    assert any(x > 2.0 * criterion.losses[0] for x in criterion.losses[:steps])


def test_nan_loss_diverges_at_that_step_without_stepping():
    criterion = RecordingLoss(nan_at=3)
    task = _task(num_train=256)
    task.criterion = criterion
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, "constant", 32)
    monitor = DivergenceMonitor(reference="first")
    loss, steps, diverged, lrs = _epoch(model, optimizer, scheduler, task, monitor, 32)
    assert (steps, diverged, len(lrs)) == (3, True, 4)
    assert monitor.num_losses == 3  # the NaN is not recorded
    assert loss == pytest.approx(sum(criterion.losses[:3]) / 3, rel=1e-12)


def test_nan_on_the_first_batch_leaves_the_model_untouched():
    criterion = RecordingLoss(nan_at=0)
    task = _task()
    task.criterion = criterion
    model = task.build_model()
    before = _params(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, "constant", 8)
    loss, steps, diverged, lrs = _epoch(model, optimizer, scheduler, task,
                                             DivergenceMonitor(reference="first"), 8)
    assert (loss, steps, diverged, lrs) == (1e9, 0, True, [0.01])  # never a perfect 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scheduler.last_epoch == 0


# --------------------------------------------------------------------------------------------
# _restore and resume
# --------------------------------------------------------------------------------------------


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_restore_without_checkpoint_starts_at_zero():
    trial = _trial(_job(), {"max_lr": 0.1, "schedule": "constant"})
    assert trial.start_epoch == 0 and not trial.replaying(1)


def test_restore_from_a_replay_marker_retrains_without_loading(tmp_path):
    (tmp_path / REPLAY_FILE).write_text(json.dumps({"epoch": 2}))
    task = _task()
    model = task.build_model()
    before = _state(model)
    trial = _trial(_job(), {"max_lr": 0.1, "schedule": "linear"}, Checkpoint.from_directory(str(tmp_path)))
    optimizer = trial.optimizer(model)
    scheduler = trial.scheduler(optimizer, 8)
    assert (trial.start_epoch, trial.replaying(2), trial.replaying(3)) == (0, True, False)
    assert trial.report(1) is False  # replayed epochs are not reported
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert scheduler.last_epoch == 0 and trial.monitor.num_losses == 0 and not optimizer.state


def _run_epochs(job, task, config, epochs, *, objects=None):
    """Train ``epochs`` (a range) as run_trial does; returns the objects and each epoch's LRs."""
    if objects is None:
        torch.manual_seed(job.search.seed)
        model, optimizer, scheduler, _ = build_run(job.optimizer, task, config, CPU, total_steps(job, task))
        monitor = DivergenceMonitor(factor=job.search.diverge_factor, smooth=job.search.diverge_smooth,
                                    reference="first")
        objects = (model, optimizer, scheduler, monitor)
    per_epoch = _horizon(job, task).steps_per_epoch
    all_lrs = []
    for epoch in epochs:
        reseed(task, epoch_seed(job.search.seed, epoch))
        _, steps, diverged, lrs = _epoch(*objects[:3], task, objects[3], per_epoch)
        assert (steps, diverged) == (per_epoch, False)
        all_lrs.append(lrs)
    return objects, all_lrs


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    job = _job(max_epochs=3, max_steps_per_epoch=5, seed=7)
    task = _task(num_train=64, batch_size=8)  # 8 batches, capped at 5 per epoch
    config = {"max_lr": 3e-3, "schedule": "cosine", "cosine": {"warmup_frac": 0.2}}

    (model, optimizer, scheduler, monitor), lrs = _run_epochs(job, task, config, range(2))

    torch.manual_seed(job.search.seed)
    saving = _trial(job, config)
    m1 = task.build_model()
    o1 = saving.optimizer(m1)
    s1 = saving.scheduler(o1, total_steps(job, task))
    (_, _, _, mon1), first = _run_epochs(job, task, config, range(1), objects=(m1, o1, s1, saving.monitor))
    saving._next_epoch()
    torch.save(saving.state(1), tmp_path / "trial.pt")
    checkpoint = Checkpoint.from_directory(str(tmp_path))

    torch.manual_seed(123)  # fresh objects, built as a restarted worker would
    trial = _trial(job, config, checkpoint)
    m2 = task.build_model()
    o2 = trial.optimizer(m2)
    s2 = trial.scheduler(o2, total_steps(job, task))
    mon2 = trial.monitor
    assert trial.start_epoch == 1 and not trial.replaying(1)
    assert mon2.num_losses == 5 and s2.last_epoch == 5
    _, second = _run_epochs(job, task, config, range(1, 2), objects=(m2, o2, s2, mon2))

    assert first + second == lrs
    assert lrs[0][0] == 0.0 and max(lrs[0] + lrs[1]) == pytest.approx(3e-3)
    resumed, straight = m2.state_dict(), model.state_dict()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert mon2.state_dict() == monitor.state_dict() and mon2.smoothed == monitor.smoothed
    assert s2.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 10
    for a, b in zip(o2.state_dict()["state"].values(), optimizer.state_dict()["state"].values(),
                    strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert not torch.equal(resumed["0.weight"], m1.state_dict()["0.weight"])  # it did train on


# --------------------------------------------------------------------------------------------
# TaskSource
# --------------------------------------------------------------------------------------------


@pytest.fixture
def clear_tasks():
    train._TASKS.clear()
    yield
    train._TASKS.clear()


def _source(job, task=None):
    return TaskSource.of(job.task, job.base_dir, task)


def test_source_without_task_builds_the_jobs_task(clear_tasks):
    job = _job()
    source = TaskSource.of(job.task, job.base_dir)
    assert source.key.endswith(job.task.model_dump_json()) and source.task is None
    task = source.get()
    assert isinstance(task, Task) and task.name == "synthetic"
    assert len(task.train_loader.dataset) == 64 and len(task.val_loader.dataset) == 32
    assert source.get() is task
    again = _job()
    assert TaskSource.of(again.task, again.base_dir).key == source.key  # same section, same key: built once per worker


def test_jobs_in_different_directories_do_not_share_a_task():
    data = {"name": "t", "task": {"kind": "image_classification", "dataset": "images"}}
    a, b = parse_job(data, base_dir="/a"), parse_job(data, base_dir="/b")
    assert a.resolve("images") != b.resolve("images")
    assert TaskSource.of(a.task, a.base_dir).key != TaskSource.of(b.task, b.base_dir).key


def test_source_with_a_task_object_returns_it(clear_tasks):
    job, task = _job(), _task()
    source = TaskSource.of(job.task, job.base_dir, task)
    assert source.get() is task
    assert source.key != job.task.model_dump_json() and TaskSource.of(job.task, job.base_dir, task).key != source.key


def test_source_with_a_factory_calls_it_once_per_process(clear_tasks):
    calls = []

    def factory():
        calls.append(1)
        return _task(num_train=40)

    job = _job()
    source = TaskSource.of(job.task, job.base_dir, factory)
    assert calls == []  # nothing is built until a trial asks
    task = source.get()
    assert source.get() is task and source.get() is task
    assert len(calls) == 1 and len(task.train_loader.dataset) == 40
    # one task at a time: another source's task replaces it in the worker's cache
    _source(_job()).get()
    assert source.get() is not task and len(calls) == 2


def test_factory_returning_a_non_task_raises_task_error(clear_tasks):
    source = _source(_job(), lambda: "not a task")
    with pytest.raises(TaskError, match="str") as info:
        source.get()
    assert "lrsearch.Task" in str(info.value)
    assert source.key not in train._TASKS


def test_a_non_callable_task_is_a_config_error():
    with pytest.raises(ConfigError, match="task") as info:
        _source(_job(), 42)
    assert "int" in str(info.value)


def test_a_task_shipped_by_value_leaves_the_standard_library_by_reference(clear_tasks):
    # the synthetic task's model is a functools.partial: its module, functools, must not be sent
    # by value (its locks would then break every later pickle, Ray Tune's trainable's among them)
    _source(_job(), _task())
    _source(_job(), functools.partial(_task, num_train=8))
    registered = cloudpickle.list_registry_pickle_by_value()
    assert not {"functools", "lrsearch.tasks.synthetic"} & registered, registered
    assert __name__ in registered  # this file's own functions still travel by value


def test_a_closure_factory_round_trips_through_cloudpickle(clear_tasks):
    num_train = 24
    calls = []

    def factory():
        calls.append(1)
        return _task(num_train=num_train, batch_size=4)

    job = _job()
    source = TaskSource.of(job.task, job.base_dir, factory)
    source.get()
    assert len(calls) == 1

    copy = cloudpickle.loads(cloudpickle.dumps(source))
    assert copy.key == source.key and copy.cfg == source.cfg and copy.base_dir == source.base_dir
    train._TASKS.clear()  # a fresh worker: nothing cached under that key
    task = copy.get()
    assert isinstance(task, Task) and len(task.train_loader.dataset) == 24
    assert len(task.train_loader) == 6
    assert list(train._TASKS) == [copy.key]
    assert len(calls) == 1  # the copy called its own copy of the closure, not this one


# --------------------------------------------------------------------------------------------
# the step budget and the trial's scheduler
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("search", "per_epoch", "total"), [
    ({}, 8, 24),  # no cap: the loader's 8 batches x the default 3 epochs
    ({"max_steps_per_epoch": 3, "max_epochs": 2}, 3, 6),
    ({"max_steps_per_epoch": 100, "max_epochs": 4}, 8, 32),  # a cap above the loader's length
])
def test_steps_per_epoch_and_total_steps_honour_the_cap(search, per_epoch, total):
    job, task = _job(**search), _task(num_train=64, batch_size=8)
    assert steps_per_epoch(task, 1, job.search.max_steps_per_epoch) == per_epoch
    assert (_horizon(job, task).steps_per_epoch, _horizon(job, task).total_steps) == (per_epoch, total)


@pytest.mark.parametrize("config", [
    {"max_lr": 3e-3, "schedule": "one_cycle", "one_cycle": {"pct_start": 0.25}},
    {"max_lr": 1e-3, "schedule": "linear", "linear": {"warmup_frac": 0.3}, "weight_decay": 0.05},
    {"max_lr": 2e-3, "schedule": "cosine_restarts", "cosine_restarts": {"T_0_frac": 0.2, "T_mult": 1}},
    {"max_lr": 5e-4, "schedule": "step", "step": {"step_size_frac": 0.25, "gamma": 0.5}},
])
def test_build_run_spans_total_steps_with_the_configs_curve(config):
    job, task = _job(max_steps_per_epoch=5, max_epochs=2), _task()
    total = total_steps(job, task)
    assert total == 10
    model, optimizer, scheduler, params = build_run(job.optimizer, task, config, CPU, total_steps(job, task))

    assert params == schedule_params(config, total)
    assert {p for g in optimizer.param_groups for p in g["params"]} == set(model.parameters())
    if "weight_decay" in config:
        assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, config["weight_decay"]}
    curve = []
    for _ in range(total):
        lrs = {float(g["lr"]) for g in optimizer.param_groups}
        assert len(lrs) == 1
        curve.append(lrs.pop())
        optimizer.step()
        scheduler.step()
    assert curve == lr_curve(config["schedule"], total, config["max_lr"], **params)
    assert max(curve) == pytest.approx(config["max_lr"], rel=0.02)  # the peak is max_lr


def test_one_cycle_trial_schedule_ends_exactly_at_total_steps():
    job, task = _job(max_steps_per_epoch=5, max_epochs=2), _task()
    config = {"max_lr": 3e-3, "schedule": "one_cycle"}
    _, optimizer, scheduler, _ = build_run(job.optimizer, task, config, CPU, total_steps(job, task))
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    with pytest.raises(ValueError, match="total steps"):  # torch refuses to step past its span
        scheduler.step()


@pytest.mark.parametrize(("search", "epochs"), [
    ({"max_epochs": 9, "grace_period": 1, "reduction_factor": 2}, [1, 2, 4, 8, 9]),  # ASHA's rungs + last
    ({"max_epochs": 9, "grace_period": 2, "reduction_factor": 3}, [2, 6, 9]),
    ({"max_epochs": 9, "early_stopping": "none"}, [1, 2, 4, 8, 9]),  # no rungs: geometric
    ({"max_epochs": 3, "checkpoint": "epoch"}, [1, 2, 3]),
    ({"max_epochs": 3, "checkpoint": "none"}, [3]),  # only the final weights, for keep_checkpoints
    ({"max_epochs": 3, "checkpoint": "none", "keep_checkpoints": "none"}, []),
])
def test_checkpoint_epochs_follow_the_policy(search, epochs):
    from lrsearch.engine.protocol import checkpoint_epochs

    job = parse_job({"name": "t", "task": {"kind": "synthetic"}, "search": search})
    assert checkpoint_epochs(job.search) == epochs


def test_a_checkpoint_holds_the_trainable_part_only():
    from lrsearch.engine import trainable_state

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen backbone layer
    state = trainable_state(model)
    assert "0.weight" not in state and "0.bias" not in state
    assert {"1.weight", "1.running_mean", "2.weight", "2.bias"} <= set(state)  # buffers travel
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    fresh[0].load_state_dict(model[0].state_dict())  # what build_model() gives back
    fresh.load_state_dict(state, strict=False)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
