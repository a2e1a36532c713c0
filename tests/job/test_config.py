"""Job files: the examples parse; bad files give one line naming the field, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lrsearch.cli import app
from lrsearch.errors import ConfigError
from lrsearch.job.parse import load_job

runner = CliRunner()
EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").rglob("*.yaml"))
OK = "name: ok\ntask: {kind: synthetic, num_train: 256, num_val: 64}\n"


def test_examples_exist_for_every_built_in_task_and_parse():
    kinds = {load_job(p).task.kind for p in EXAMPLES}
    assert kinds == {"synthetic", "text_classification", "image_classification", "python", "language_modeling"}


def _run(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return runner.invoke(app, ["find-lr", str(path)])


BAD = [
    # (job file text, fragments the one error line must contain)
    ("name: x\ntask: {kind: synthetic, batch_size: -4}\n", ["task.batch_size", "-4", ">= 1"]),
    ("name: x\ntask: {kind: synthetic, batchsize: 4}\n", ["task.batchsize", "unknown field", "batch_size"]),
    ("name: x\ntask: {kind: vision}\n", ["task.kind", "'vision'", "text_classification"]),
    ("name: x\ntask: {model: minilm-l6}\n", ["task.kind", "required"]),
    ("name: x\n", ["task: missing", "task section"]),
    ("task: {kind: synthetic}\n", ["name", "required"]),
    ("name: 'a b'\ntask: {kind: synthetic}\n", ["name", "'a b'", "letters"]),
    (OK + "optimizer: {name: lion}\n", ["optimizer.name", "'lion'", "adamw"]),
    (OK + "optimizer: {weight_decay: .nan}\n", ["optimizer.weight_decay", "nan", "finite number"]),
    (OK + "range_test: {start_lr: 1.0, end_lr: 0.1}\n", ["range_test.end_lr", "0.1", "start_lr"]),
    (OK + "range_test: {mode: log}\n", ["range_test.mode", "'log'", "'exp'"]),
    (OK + "range_test: {num_steps: 1}\n", ["range_test.num_steps", "1", ">= 2"]),
    (OK + "rangetest: {}\n", ["rangetest", "unknown field", "range_test"]),
    (OK + "space: {family: llama}\n", ["space.family", "'llama'", "bert"]),
    (OK + "space: {schedules: [cosin]}\n", ["space.schedules", "'cosin'", "cosine"]),
    (OK + "space: {max_lr: {low: 1.0e-3, high: 1.0e-4}}\n", ["space.max_lr", "must be less than"]),
    (OK + "search: {grace_period: 5, max_epochs: 2}\n", ["search", "grace_period (5)", "max_epochs (2)"]),
    (OK + "search: {reduction_factor: 1}\n", ["search.reduction_factor", "1", ">= 2"]),
    (OK + "resources: {gpu: -1}\n", ["resources.gpu", "-1", ">= 0"]),
    (OK + "search: {num_trials: many}\n", ["search.num_trials", "'many'", "an integer"]),
    ("name: x\ntask: {kind: python, entrypoint: my_task}\n", ["task.entrypoint", "'my_task'", "module:function"]),
    ("name: x\ntask: {kind: text_classification, categories: [law]}\n", ["task.categories", "['law']", "2 distinct"]),
    ("name: x\ntask: {kind: image_classification, image_size: 4}\n", ["task.image_size", "4", ">= 8"]),
    ("name: x\ntask: {kind: text_classification, peft: {rank: 4}}\n", ["task.peft.rank", "unknown field", "alpha"]),
    (OK + "space: {max_lr: {low: 1.0e-5, high: 1.0e-3, lo: 2}}\n", ["space.max_lr.lo", "unknown field", "log"]),
    ("name: x\ntask: [kind, synthetic\n", ["YAML syntax error", "line"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
    ("", ["empty"]),
]


@pytest.mark.parametrize(("text", "fragments"), BAD, ids=[f"bad{i:02d}" for i in range(len(BAD))])
def test_bad_job_file_gives_one_line_naming_the_field(tmp_path, text, fragments):
    result = _run(tmp_path, text)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "lrsearch-runs").exists()  # nothing started, nothing written


def test_every_bad_value_gets_its_own_line(tmp_path):
    result = _run(tmp_path, "name: x\ntask: {kind: synthetic, batch_size: 0, hidden: -1}\n")
    assert result.exit_code == 2
    assert "task.batch_size" in result.output and "task.hidden" in result.output
    assert len(result.output.strip().splitlines()) == 2


def test_missing_job_file(tmp_path):
    result = runner.invoke(app, ["find-lr", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output and "not found" in result.output


@pytest.mark.parametrize(
    ("task", "fragments"),
    [
        ("{kind: text_classification, model: no-such-model-dir/}", ["task.model", "no-such-model-dir"]),
        ("{kind: text_classification, dataset: missing.csv}", ["task.dataset", "missing.csv"]),
        ("{kind: text_classification, categories: [law, no_such_category]}", ["task.categories", "no_such_category"]),
        ("{kind: image_classification, dataset: imagenet}", ["task.dataset", "imagenet"]),
        ("{kind: image_classification, model: resnet9000}", ["task.model", "resnet9000"]),
        ("{kind: python, entrypoint: 'no_such_module:build'}", ["task.entrypoint", "no_such_module"]),
    ],
)
def test_missing_model_or_dataset_is_one_line(tmp_path, monkeypatch, task, fragments):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = _run(tmp_path, f"name: x\ntask: {task}\n")
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    assert "Traceback" not in result.output


def test_find_lr_json_on_synthetic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(OK + "range_test: {num_steps: 40, end_lr: 1.0}\n")
    result = runner.invoke(app, ["find-lr", "job.yaml", "--json", "--plot", "curve.png"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    low, high = data["bounds"]
    assert 0 < low < high <= 1.0
    assert set(data["suggestions"]) == {"steepest", "valley", "minimum", "slide"}
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "lrsearch-runs" / "ok" / "range_test.json").read_text())
    assert saved["bounds"] == [low, high]


def test_find_lr_says_when_the_curve_shows_no_descent(tmp_path, monkeypatch):
    # a sweep over LRs far too small to move the loss: nothing to suggest, bounds inside the sweep
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(OK + "range_test: {num_steps: 30, start_lr: 1.0e-12, end_lr: 1.0e-10}\n")
    result = runner.invoke(app, ["find-lr", "job.yaml"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "warning: the smoothed loss never fell 5 %" in result.output
    data = json.loads((tmp_path / "lrsearch-runs" / "ok" / "range_test.json").read_text())
    assert all(v is None for v in data["suggestions"].values())
    assert 1e-12 <= data["bounds"][0] < data["bounds"][1] <= 1e-10
    assert data["warning"].startswith("the smoothed loss never fell")


def test_find_lr_on_the_python_task_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = Path(__file__).resolve().parents[2] / "examples" / "python_task" / "job.yaml"
    result = runner.invoke(app, ["find-lr", str(job)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "digits-cnn" in result.output and "max_lr search bounds" in result.output


def test_find_lr_is_reproducible_within_one_process():
    # what ran before (another range test on the same task, advancing its loader) must not matter
    from lrsearch.job.parse import parse_job
    from lrsearch.range_test.finder import find_lr
    from lrsearch.tasks import build_task

    job = parse_job({"name": "again", "task": {"kind": "synthetic", "num_train": 256, "num_val": 64},
                     "range_test": {"num_steps": 20, "end_lr": 1.0}})
    task = build_task(job)
    first = find_lr(job, task=task)[1]
    next(iter(task.train_loader))  # move the loader's shuffling on
    second = find_lr(job, task=task)[1]
    assert first.raw_losses == second.raw_losses and first.bounds() == second.bounds()


ARM_SPACE = """family: default
description: linear or the schedule-free arm
max_lr_prior: {low: 1.0e-4, high: 1.0e-2, log: true}
default_schedule: linear
schedules:
  linear:
    warmup_frac: {low: 0.0, high: 0.2}
  schedule_free:
    warmup_frac: {low: 0.0, high: 0.1}
"""


def test_the_schedule_free_arm_is_opt_in_left_out_of_an_sgd_jobs_space_and_refused_when_asked_for(tmp_path):
    import lrsearch

    (tmp_path / "arm.yaml").write_text(ARM_SPACE)
    sgd = {"name": "x", "task": {"kind": "synthetic"}, "optimizer": {"name": "sgd"},
           "space": {"file": str(tmp_path / "arm.yaml")}}
    adamw = {**sgd, "optimizer": {"name": "adamw"}}
    assert "schedule_free" not in lrsearch.load_job({**adamw, "space": {}}).search_space().schedules  # opt-in
    assert "schedule_free" in lrsearch.load_job(adamw).search_space().schedules
    assert list(lrsearch.load_job(sgd).search_space().schedules) == ["linear"]
    with pytest.raises(ConfigError, match="'schedule_free' trains AdamWScheduleFree.*got optimizer.name: sgd"):
        lrsearch.load_job({**sgd, "space": {**sgd["space"], "schedules": ["linear", "schedule_free"]}}).search_space()
