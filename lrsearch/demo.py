"""``lrsearch demo``: the main job on the embedded defaults (MiniLM-L6 on fortunes, offline)."""

from __future__ import annotations

from lrsearch.config import JobConfig, parse_job


def demo_job(*, quick: bool = False, storage: str = "lrsearch-runs") -> JobConfig:
    """The embedded demo job: all-MiniLM-L6-v2 classifying four fortunes categories."""
    return parse_job(
        {
            "name": "demo-quick" if quick else "demo",
            "task": {
                "kind": "text_classification",
                "model": "minilm-l6",
                "dataset": "fortunes",
                "categories": ["computers", "food", "law", "science"],
                "num_train": 192 if quick else 1024,
                "num_val": 96 if quick else 256,
                "max_length": 40 if quick else 64,
                "batch_size": 16,
            },
            "optimizer": {"name": "adamw", "weight_decay": 0.01},
            "range_test": {"start_lr": 1e-7, "end_lr": 1.0},  # num_steps: auto
            "space": {"family": "bert"},
            "search": {
                "num_trials": 6 if quick else 16,
                "max_epochs": 2 if quick else 3,
                "grace_period": 1,
                "reduction_factor": 2,
                "max_concurrent_trials": 2,
            },
            "storage": {"path": storage},
        },
        source="demo",
    )
