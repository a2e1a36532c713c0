"""Ray Tune wiring: start or join Ray, and build the ``Tuner`` (fresh, or restored to resume).

The one use of Ray's private API is here: a restored ``Tuner`` does not take callbacks, and
lrsearch's live progress line is a callback (ray-project/ray#41364); and a resume may change
``search.budget``, which the restored searcher and scheduler then hold.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lrsearch.job.config import ResourcesConfig, SearchConfig
from lrsearch.tuning.budget import BudgetedSearch, BudgetScheduler, Ledger
from lrsearch.tuning.checkpoints import keep_latest_checkpoint
from lrsearch.tuning.optuna_adapter import PrunedAwareOptunaSearch, make_sampler, study_storage

TUNE_DIR = "tune"


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
