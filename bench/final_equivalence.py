"""Does the final run train exactly as it did before a change to the training engine?

A deterministic ``lrsearch.train`` on tiny digits (EfficientNet-Lite0, 3 search trials one at a
time, seed 0, no clipping), two candidates (the best config at 1x and 0.5x its ``max_lr``) trained
for 4 epochs, tracked in a throwaway sqlite MLflow store. Through the public API only. Run it on two
checkouts and compare the JSON files: every candidate's per-epoch metrics and per-step LRs as
logged to MLflow, each candidate's final validation score, and the test metric.

    PYTHONPATH=<checkout> .venv/bin/python bench/final_equivalence.py OUT.json
    cmp old.json new.json
"""

from __future__ import annotations

import json
import sys
import tempfile

import lrsearch


def main(out: str) -> None:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        job = {"name": "final-equiv",
               "task": {"kind": "image_classification", "model": "efficientnet-lite0", "dataset": "digits",
                        "image_size": 32, "num_train": 192, "num_val": 256, "num_test": 256,
                        "batch_size": 32, "seed": 0},
               "space": {"family": "efficientnet"},
               "range_test": {"enabled": False},
               "search": {"num_trials": 3, "max_epochs": 2, "max_concurrent_trials": 1, "seed": 0,
                          "early_stopping": "none"},
               "train": {"max_grad_norm": None},
               "tracking": {"uri": uri},
               "storage": {"path": tmp}}
        search = lrsearch.search(job, show_progress=False)
        final = lrsearch.train(job, search=search, epochs=4, lr_scales=(1.0, 0.5))
        client = MlflowClient(uri)
        run = client.get_run(final.run_id)
        history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(final.run_id, key),
                                                            key=lambda m: (m.step, m.timestamp))]
                   for key in sorted(run.data.metrics)}
        record = {"search_best": search.best.value, "config": final.config, "test_metric": final.test_metric,
                  "test_loss": final.test_loss, "val_metric": final.val_metric,
                  # Tune's trial ids are random: a candidate is named by its LR scale ("1x", "0.5x")
                  "candidates": [{"scale": c["trial_id"].partition("@")[2] or "1x",
                                  **{k: c[k] for k in ("val_metric", "val_loss", "diverged", "epochs")}}
                                 for c in final.candidates],
                  "total_steps": final.total_steps, "history": history}
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"test {final.test_metric} in {final.seconds:.0f} s -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
