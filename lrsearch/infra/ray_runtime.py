"""Starting or joining Ray, and checking that one trial (or a final run) fits a node, for the search
and the final run alike."""

from __future__ import annotations

import os
import time
from typing import Any

from lrsearch.console import err
from lrsearch.errors import SearchError
from lrsearch.job.config import ResourcesConfig

__all__ = ["check_resources", "init_ray"]


def init_ray(address: str | None, verbose: bool) -> bool:
    """Connect to (or start) Ray. Returns True if this call started it (and must shut it down)."""
    import ray

    # Tune's output settings, read when a search starts: on a Ray the caller started too (its
    # "Configuration for experiment" table would otherwise land in `--json`'s stdout)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not verbose:
        # Fast trials checkpoint often; Tune's "snapshotting may become a bottleneck" is noise here.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        # --address, or RAY_ADDRESS (set by Ray for a submitted job's entrypoint): join that cluster
        try:
            ray.init(address=target, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SearchError(f"--address {target!r}: cannot connect to a Ray cluster: {first}") from None
    else:
        # "local": a fresh Ray for this search, never whatever cluster `ray start` last left recorded
        # on this machine (ray.init()'s default would join that one)
        ray.init(address="local", include_dashboard=False, **kwargs)
    return True


def _fits(node: dict[str, float], need: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in need.items() if v)


def check_resources(r: ResourcesConfig, *, joined: bool) -> None:
    """Fail before anything starts when no node of the Ray cluster can hold one trial (Ray Tune
    would leave the search pending forever), or wait ``resources.wait_for_node_s`` for one
    (default: 600 s on a cluster the search ``joined``, where an autoscaler may add the node).

    Raises:
        SearchError: naming the field (``resources.gpu`` / ``resources.cpu``), the value asked for
            and the largest node's.
    """
    import ray

    need = {"CPU": r.cpu, "GPU": r.gpu}
    wait = r.wait_for_node_s if r.wait_for_node_s is not None else (600.0 if joined else 0.0)
    deadline, said = time.monotonic() + wait, False
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if any(_fits(n, need) for n in nodes):
            return
        if time.monotonic() >= deadline:
            raise SearchError(_too_big(need, nodes, wait))
        if not said:  # always shown: a search that seems to hang must say why

            err.print(f"waiting up to {wait:g} s for a node with {r.cpu:g} CPU and {r.gpu:g} GPU "
                      "(resources.wait_for_node_s), e.g. from the cluster's autoscaler", highlight=False)
            said = True
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def _too_big(need: dict[str, float], nodes: list[dict[str, float]], waited: float) -> str:
    most = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in need}
    field, key = ("gpu", "GPU") if need["GPU"] > most["GPU"] else ("cpu", "CPU")
    if need[key] <= most[key]:  # each fits somewhere, never both on one node
        largest = ", ".join(f"{n.get('CPU', 0):g} CPU + {n.get('GPU', 0):g} GPU" for n in nodes)
        return (f"resources: got cpu {need['CPU']:g} and gpu {need['GPU']:g} per trial; no single node has "
                f"both (nodes: {largest}); lower one of them")
    after = f" after waiting {waited:g} s" if waited else ""
    return (f"resources.{field}: got {need[key]:g} per trial; the largest node of this Ray cluster has "
            f"{most[key]:g} {key}{after}; allowed: at most {most[key]:g} (or add such a node; with an "
            f"autoscaler, raise resources.wait_for_node_s)")
