"""GPU packing with Ray's logical GPUs (a CPU machine declaring num_gpus=1): four `gpu: 0.25`
trials run at once, each told its GPU by CUDA_VISIBLE_DEVICES, never a fifth; a job asking for more
than any node has is one clear error before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lrsearch


def _job(tmp_path, name, **resources):
    return {
        "name": name,
        # ~8 s of training per trial: four of them overlap even when a busy machine starts their
        # workers seconds apart
        "task": {"kind": "synthetic", "num_train": 16384, "num_val": 256, "batch_size": 64, "hidden": 512},
        "range_test": {"enabled": False},
        "search": {"num_trials": 8, "max_epochs": 1, "grace_period": 1, "max_concurrent_trials": 8,
                   "early_stopping": "none", "checkpoint": "none", "keep_checkpoints": "none"},
        "resources": resources,
        "storage": {"path": str(tmp_path / "runs")},
    }


def test_four_quarter_gpu_trials_share_one_gpu_and_never_five(gpu_ray, tmp_path):
    res = lrsearch.search(_job(tmp_path, "pack", cpu=0.25, gpu=0.25), track=False)
    assert res.counts["completed"] == 8
    spans, devices = [], set()
    for t in res.trials:
        (result,) = [json.loads(line) for line in (Path(t.path) / "result.json").read_text().splitlines()]
        # the epoch's own wall clock: from its start to its report (Ray's timestamp is whole seconds)
        spans.append((result["epoch_started_at"], result["epoch_started_at"] + result["train_seconds"]))
        devices.add(result["cuda_visible_devices"])
    assert devices == {"0"}  # every trial was told the one GPU
    # the most trials alive at once: four (a GPU holds four quarters), never five
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    alive, most = 0, 0
    for _, step in events:
        alive += step
        most = max(most, alive)
    assert most == 4, spans


@pytest.mark.parametrize(("resources", "message"), [
    ({"gpu": 2}, "resources.gpu: got 2 per trial; the largest node of this Ray cluster has 1 GPU"),
    ({"cpu": 3}, "resources.cpu: got 3 per trial; the largest node of this Ray cluster has 2 CPU"),
])
def test_a_trial_bigger_than_any_node_is_one_error_before_anything_starts(gpu_ray, tmp_path,
                                                                          resources, message):
    # this Ray was started by the test, not the search: say that nothing will join it
    with pytest.raises(lrsearch.SearchError, match=message.replace(".", r"\.")):
        lrsearch.search(_job(tmp_path, "big", wait_for_node_s=0, **resources))
    out = tmp_path / "runs" / "big"
    assert not (out / "mlflow.json").exists() and not (out / "tune").exists()  # nothing started


def test_waiting_for_a_node_gives_up_after_the_configured_time(gpu_ray, tmp_path):
    with pytest.raises(lrsearch.SearchError, match=r"after waiting 1 s"):
        lrsearch.search(_job(tmp_path, "wait", gpu=2, wait_for_node_s=1), track=False)
