"""`lrsearch search` on every example job (made small), offline, on one local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import minilm_l1, mlflow_uri

import lrsearch
from lrsearch.job.parse import parse_job

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = {
    "text_classification": {"num_train": 32, "num_val": 16, "max_length": 24, "batch_size": 8},
    "image_classification": {"num_train": 64, "num_val": 32, "batch_size": 16, "image_size": 32},
    "synthetic": {"num_train": 256, "num_val": 64},
    "python": {},
    "language_modeling": {"num_train": 32, "num_val": 16, "num_test": 16, "max_length": 24, "batch_size": 8},
}


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.parent.name + "/" + p.stem)
def test_example_searches_offline(local_ray, path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = yaml.safe_load(path.read_text())
    data["task"].update(SMALL[data["task"]["kind"]])
    data["range_test"] = {**data.get("range_test", {}), "num_steps": 12}
    # one trial at a time: the second reuses the first's worker and its loaded model
    data["search"] = {**data.get("search", {}), "num_trials": 2, "max_epochs": 1, "grace_period": 1,
                      "max_concurrent_trials": 1}
    data["storage"] = {"path": str(tmp_path / "runs")}
    data["tracking"] = {"uri": mlflow_uri(tmp_path)}
    if data["task"]["kind"] == "language_modeling":  # the example builds its tiny GPT-2 first
        import importlib.util

        spec = importlib.util.spec_from_file_location("make_tiny_gpt2", path.parent / "make_tiny_gpt2.py")
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        data["task"]["model"] = str(builder.build(tmp_path / "tiny-gpt2"))
    if data["task"].get("model") == "minilm-l6":  # its first encoder layer: the example's job, 6x fewer layers
        data["task"]["model"] = minilm_l1()
    if data["task"]["kind"] == "text_classification":
        # discriminative fine-tuning: a lower LR for each lower encoder layer
        data["space"] = {**data.get("space", {}), "layer_decay": {"low": 0.7, "high": 0.95}}
    job = parse_job(data, source=str(path), base_dir=str(path.parent))
    result = lrsearch.search(job)
    assert result.counts["total"] == 2 and result.counts["errored"] == 0, result.trials
    assert result.best is not None and result.best_metric is not None
    assert Path(result.paths["trials"]).is_file() and Path(result.paths["best_config"]).is_file()
    if data["task"]["kind"] == "text_classification":
        assert all(0.7 <= t.layer_decay <= 0.95 for t in result.trials)
