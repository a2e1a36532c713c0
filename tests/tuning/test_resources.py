"""A trial asking for more than this machine has, on the local Ray a search starts itself: one
line naming the field, at once (nothing can join such a Ray, so there is nothing to wait for)."""

from __future__ import annotations

import pytest
import ray

import lrsearch


def test_a_gpu_trial_on_a_machine_without_one_fails_at_once(no_ray, tmp_path):
    assert not ray.is_initialized()  # the search starts (and stops) its own Ray
    job = {"name": "gpu", "task": {"kind": "synthetic"}, "resources": {"gpu": 1},
           "storage": {"path": str(tmp_path / "runs")}, "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}}
    with pytest.raises(lrsearch.SearchError,
                       match=r"^resources\.gpu: got 1 per trial; the largest node of this Ray cluster has 0 GPU") as info:
        lrsearch.search(job)
    assert "after waiting" not in str(info.value)  # no wait for an autoscaler that cannot exist
    assert not ray.is_initialized()
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "runs" / "gpu" / "mlflow.json").exists()
