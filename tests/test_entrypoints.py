"""A job file's `kind: python` entrypoint may return a Task, a transformers.Trainer, a Lightning
module with its data module, or a train_fn: `lrsearch search` runs each for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import mlflow_uri
from typer.testing import CliRunner

import lrsearch
from lrsearch.cli import app
from lrsearch.errors import TaskError
from lrsearch.tasks import Task, build_task
from lrsearch.tasks.user import python_loop


def _section(job):
    """What python_loop takes of a job: its task section and the folder its paths are relative to."""
    return job.task, job.base_dir


TESTS = Path(__file__).resolve().parent
INTEGRATIONS = TESTS / "integrations"  # test_lightning's model and data

MODULE = '''
import sys
sys.path[:0] = [{integrations!r}, {tests!r}]
import torch
from torch import nn
from torch.nn import functional as F
import lrsearch


def loop(trial):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = trial.optimizer(model)
    scheduler = trial.scheduler(optimizer, total_steps=4 * trial.max_epochs)
    for epoch in range(trial.start_epoch, trial.max_epochs):
        for i in range(4):
            loss = F.cross_entropy(model(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64])
            optimizer.zero_grad(); loss.backward(); optimizer.step(); scheduler.step()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        if trial.report(epoch + 1, accuracy=accuracy, train_loss=loss.item()):
            return


def train_fn(scale=1):
    return loop


def trainer():
    from test_hf_trainer import make_trainer
    return make_trainer()


def task():
    return lrsearch.tasks.synthetic_task(num_train=64, num_val=32)


def lightning():
    import test_lightning
    return test_lightning.make_module(), test_lightning.Digits()


def nothing():
    return 42
'''


def _job(tmp: Path, name: str, entry: str, **search) -> Path:
    (tmp / "entries.py").write_text(MODULE.format(tests=str(TESTS), integrations=str(INTEGRATIONS)))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "task": {"kind": "python", "entrypoint": f"entries:{entry}"},
        "space": {"family": "default", "max_lr": {"low": 1e-3, "high": 0.1}},
        "search": {"num_trials": 3, "max_epochs": 2, **search},
        "storage": {"path": str(tmp / "runs")},
        "tracking": {"uri": mlflow_uri(tmp), "experiment": name}}))
    return path


def test_the_entrypoints_return_is_told_apart(tmp_path):
    kind, got = python_loop(*_section(lrsearch.load_job(_job(tmp_path, "a", "train_fn"))))
    assert kind == "train_fn" and got.func.__name__ == "run_entry_loop"
    kind, got = python_loop(*_section(lrsearch.load_job(_job(tmp_path, "b", "task"))))
    assert kind == "task" and isinstance(got, Task)
    kind, factory = python_loop(*_section(lrsearch.load_job(_job(tmp_path, "c", "trainer"))))
    assert kind == "trainer" and type(factory()).__name__ == "Trainer"
    with pytest.raises(TaskError, match="returned int; allowed: an lrsearch.Task, a transformers.Trainer"):
        python_loop(*_section(lrsearch.load_job(_job(tmp_path, "d", "nothing"))))


def test_lrsearch_search_runs_a_train_fn_entrypoint(local_ray, tmp_path):
    job = _job(tmp_path, "entry-fn", "train_fn")
    r = CliRunner().invoke(app, ["search", str(job), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["best_config"]["max_lr"] > 0 and Path(out["paths"]["trials"]).is_file()


def test_a_trainer_entrypoint_is_searched_as_a_trainer(local_ray, tmp_path):
    job = _job(tmp_path, "entry-hf", "trainer", num_trials=2, max_epochs=1, grace_period=1)
    data = yaml.safe_load(job.read_text())
    data["range_test"] = {"enabled": False}
    data["space"] = {"family": "bert"}
    job.write_text(yaml.safe_dump(data))
    result = lrsearch.search(job, track=False)
    assert result.metric == "val_accuracy" and len(result.trials) == 2
    assert type(result).__name__ == "TrainerSearchResult" and result.model is not None


def test_a_lightning_entrypoint_is_searched_as_a_lightning_module(local_ray, tmp_path):
    job = _job(tmp_path, "entry-pl", "lightning", num_trials=2, max_epochs=1)
    kind, (module_factory, data_factory) = python_loop(*_section(lrsearch.load_job(job)))
    assert kind == "lightning" and type(module_factory()).__name__ == "MLP"
    result = lrsearch.search(job, track=False)
    assert result.metric == "val_accuracy" and len(result.trials) == 2 and result.best is not None


def test_a_final_run_of_a_non_task_entrypoint_says_why(tmp_path):
    with pytest.raises(TaskError, match="a final run needs a Task"):
        build_task(lrsearch.load_job(_job(tmp_path, "e", "train_fn")))
