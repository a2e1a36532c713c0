"""A killed search of the built-in loop on the LoRA text task and on the causal-LM task: the driver
is SIGKILLed while the third trial trains, then `lrsearch search --resume` finishes the search, with
every trial's epochs logged to MLflow once and every step at its schedule's LR."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import joined, minilm_l1, mlflow_uri
from mlflow import MlflowClient
from protocol_checks import assert_schedules, finish, kill_when, tune_saved

import lrsearch

LRSEARCH = str(Path(sys.executable).with_name("lrsearch"))
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _tiny_gpt2(tmp: Path) -> str:
    spec = importlib.util.spec_from_file_location("make_tiny_gpt2", EXAMPLES / "causal_lm" / "make_tiny_gpt2.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return str(builder.build(tmp / "tiny-gpt2"))


def _task(kind: str, tmp: Path) -> dict:
    if kind == "lora":
        return {"kind": "text_classification", "model": minilm_l1(), "num_train": 128, "num_val": 32,
                "num_test": 0, "max_length": 16, "batch_size": 8, "peft": {"r": 4, "alpha": 8}}
    return {"kind": "language_modeling", "model": _tiny_gpt2(tmp), "categories": ["computers", "science"],
            "num_train": 512, "num_val": 32, "num_test": 0, "max_length": 32, "batch_size": 8}


# The tiny GPT-2 and MiniLM's first layer train an epoch in about a second: with 4 epochs the third
# trial can run from its second checkpoint to its end before the kill comes (it did, once, with
# LoRA). Six epochs leave it four epochs' time at a resumable checkpoint.
EPOCHS = {"lora": 6, "causal_lm": 6}


def _start(job_file: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([LRSEARCH, "search", str(job_file), "--json", *args], cwd=job_file.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**joined(), "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"})


@pytest.mark.parametrize("kind", ["lora", "causal_lm"])
def test_a_killed_search_of_a_builtin_task_resumes(kind, tmp_path):
    name = f"kill-{kind}"
    job_file = tmp_path / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump({
        "name": name, "task": _task(kind, tmp_path),
        "range_test": {"enabled": False},
        "space": {"family": "lora" if kind == "lora" else "gpt2"},
        "search": {"num_trials": 3, "max_epochs": EPOCHS[kind], "early_stopping": "none", "checkpoint": "epoch",
                   "max_concurrent_trials": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_uri(tmp_path), "experiment": name}}))
    tune_dir = tmp_path / "runs" / name / "tune"
    kill_when(_start(job_file), lambda: tune_saved(tune_dir, 3, "checkpoint_000001"),
              "the third trial's second checkpoint")
    summary = json.loads(finish(_start(job_file, "--resume")).strip().splitlines()[-1])
    assert summary["counts"]["total"] == 3 and summary["counts"]["completed"] == 3, summary["counts"]
    spooled = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "runs").rglob("mlflow-spool/*/*"))
    assert summary["paths"]["mlflow_pending"] == "0" and not spooled, (summary["paths"], spooled)

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(uri)
    metric = "val_accuracy" if kind == "lora" else "val_loss"
    for run in client.search_runs([client.get_experiment_by_name(name).experiment_id]):
        if run.data.tags.get("lrsearch.role") == "trial":
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
            assert steps == list(range(1, EPOCHS[kind] + 1)), (run.info.run_name, run.data.tags.get("lrsearch.state"), steps)
    # the resumed trials' LRs, step by step, are their schedules' (no step lost or repeated)
    result = lrsearch.search(job_file, resume=True, track=False)  # finished: read back, nothing trains
    assert_schedules(uri, result, result.steps_per_epoch, experiment=name)
