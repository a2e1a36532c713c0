"""``lrsearch demo``: the main job on the embedded defaults (MiniLM-L6 on fortunes, offline)."""

from __future__ import annotations

from lrsearch.job.config import JobConfig
from lrsearch.job.parse import parse_job


def demo_job(*, quick: bool = False, storage: str = "lrsearch-runs") -> JobConfig:
    """The embedded demo job: all-MiniLM-L6-v2 classifying four fortunes categories.

    Sized so that a trial's horizon can use the range test's bounds: batches of 8 give
    twice the optimizer steps of batches of 16 for the same compute, and ASHA's first rung comes
    after 48 steps (quick: epoch 2 of 3), where max_lr 1e-4 learns past the majority class (24 steps
    do not; max_lr 3e-5 learns nothing even in 96). The range test therefore sweeps from 1e-4: the
    bounds never go below the sweep's first LR. It steps on the trials' own batches of 8, over half
    as many as one trial: accumulating two batches a step measured batch 16, which holds a higher
    LR, and its bounds reached 2.5e-3, where a trial at batch 8 ended at the majority class.
    """
    num_train, batch_size = (192, 8) if quick else (1024, 8)
    max_epochs, grace_period = (3, 2) if quick else (3, 1)
    trial_batches = max_epochs * num_train // batch_size  # one trial's horizon
    return parse_job(
        {
            "name": "demo-quick" if quick else "demo",
            "task": {
                "kind": "text_classification",
                "model": "minilm-l6",
                "dataset": "fortunes",
                "categories": ["computers", "food", "law", "science"],
                "num_train": num_train,
                "num_val": 192 if quick else 256,  # accuracy in steps of 1/192: fewer ties
                "max_length": 40 if quick else 64,
                "batch_size": batch_size,
            },
            "optimizer": {"name": "adamw", "weight_decay": 0.01},
            "range_test": {"start_lr": 1e-4, "end_lr": 1.0, "num_steps": min(100, trial_batches // 2)},
            "space": {"family": "bert"},
            "search": {
                "num_trials": 6 if quick else 16,
                "max_epochs": max_epochs,
                "grace_period": grace_period,
                "reduction_factor": 2,
                "max_concurrent_trials": 2,
            },
            "storage": {"path": storage},
        },
        source="demo",
    )
