"""Shared fixtures: one local Ray per test module (ray.init takes ~10 s here)."""

from __future__ import annotations

import socket

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    # "local": never join a cluster `ray start` may have left recorded on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
