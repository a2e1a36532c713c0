"""Ray Tune wiring: start or join Ray, and build the ``Tuner`` (fresh, or restored to resume).

The one use of Ray's private API is here: a restored ``Tuner`` does not take callbacks, and
lrsearch's live progress line is a callback (ray-project/ray#41364); and a resume may change
``search.budget``, which the restored searcher and scheduler then hold.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from lrsearch.config import ResourcesConfig, SearchConfig
from lrsearch.errors import SearchError
from lrsearch.tuning.budget import BudgetedSearch, BudgetScheduler, Ledger
from lrsearch.tuning.checkpoints import keep_latest_checkpoint
from lrsearch.tuning.optuna_adapter import PrunedAwareOptunaSearch, make_sampler, study_storage

TUNE_DIR = "tune"


def init_ray(address: str | None, verbose: bool) -> bool:
    """Connect to (or start) Ray. Returns True if this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not verbose:
        # Fast trials checkpoint often; Tune's "snapshotting may become a bottleneck" is noise here.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
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
            from lrsearch.console import err

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


def tune_state_exists(root: str) -> bool:
    """Whether ``root`` holds a Ray Tune experiment state to resume."""
    from ray import tune

    tune_path = f"{root}/{TUNE_DIR}"
    if "://" not in root and not Path(tune_path).exists():
        return False
    return tune.Tuner.can_restore(tune_path)


def _scheduler(s: SearchConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if s.early_stopping == "none":
        return FIFOScheduler()
    # Tune hands its metric to a scheduler without one of its own; one ranking by another metric
    # is built with it (and Tune is then given no metric: it refuses both)
    own = {"metric": "val_loss", "mode": "min"} if s.rung_metric == "val_loss" else {}
    return ASHAScheduler(time_attr="training_iteration", max_t=s.max_epochs,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor, **own)


def build_tuner(s: SearchConfig, resources: ResourcesConfig, name: str, trainable: Any, *, sampler: Any, first_points: list[dict],
                metric: str, mode: str, root: str, study_path: str | None, resume: bool,
                callbacks: list[Any], verbose: bool, ledger: Ledger,
                warm_trials: list[Any] = ()) -> tuple[Any, PrunedAwareOptunaSearch | None]:
    """The ``Tuner`` for a job's search (``s``; ``resources`` per trial; ``name``: the study's), and its searcher (``None`` when restored: Tune restores it).
    The ``ledger`` holds the job's budget and decides which trials start and train on.
    ``warm_trials`` seed a fresh search's study (``search.warm_start``); a restored one has them."""
    from ray import tune

    if not verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    # a job's start_points may lie outside the space (a default config to compare with): intended
    warnings.filterwarnings("ignore", message=r"Fixed parameter .* is out of range")
    trainable = tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu})
    tune_path = f"{root}/{TUNE_DIR}"
    if resume:
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
        # callbacks are not part of the saved state and restore() takes none (ray-project/ray#41364)
        local = tuner._local_tuner  # noqa: SLF001
        local._run_config.callbacks = [*callbacks, keep_latest_checkpoint()]
        # the job's budget now, not the saved one (the spent totals come back with the searcher's state)
        for part in (local._tune_config.search_alg, local._tune_config.scheduler):
            if isinstance(part, BudgetedSearch | BudgetScheduler):  # not in a search saved before budgets
                part.ledger = ledger
        return tuner, None
    searcher = PrunedAwareOptunaSearch(
        space=sampler, metric=metric, mode=mode, points_to_evaluate=first_points or None,
        sampler=make_sampler(s.algorithm, seed=s.seed, num_trials=s.num_trials),
        storage=study_storage(study_path), study_name=name, max_t=s.max_epochs, num_trials=s.num_trials,
        warm_trials=warm_trials,
    )
    scheduler = _scheduler(s)
    if getattr(scheduler, "metric", None):  # ranks by its own metric; the searcher keeps the objective
        metric, mode = None, None
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=s.num_trials,
            # the budget decides which trials start and which train on (time_budget_s is its wall_s)
            search_alg=BudgetedSearch(searcher, ledger, max_concurrent=s.max_concurrent_trials),
            scheduler=BudgetScheduler(scheduler, ledger),
            # a reused worker keeps the built task (pretrained weights, tokenised data)
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=root,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            # every checkpoint kept by Tune (num_to_keep=None), the superseded ones deleted by
            # keep_latest_checkpoint: num_to_keep=1 would also save every trial's state at each
            # checkpoint, O(trials) per trial (BENCHMARKS.md, scale). Tune's state then lags
            # optuna.db by its save period; a resume squares the two (PrunedAwareOptunaSearch.restore)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            verbose=2 if verbose else 0, callbacks=[*callbacks, keep_latest_checkpoint()],
        ),
    )
    return tuner, searcher
