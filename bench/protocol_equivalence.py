"""Does the built-in loop on the trial protocol train exactly as the loop it replaced?

One search, one trial at a time so that its outcome is deterministic (tiny digits, EfficientNet-
Lite0, the efficientnet space, 6 trials of 3 epochs, ASHA, seed 0, no clipping), through the public
API only. Run it on two checkouts and compare the JSON files: the range test's bounds, and every
trial's config, state and per-epoch metric, train loss and validation loss.

    PYTHONPATH=<checkout> .venv/bin/python bench/protocol_equivalence.py OUT.json
    cmp old.json new.json
"""

from __future__ import annotations

import json
import sys
import tempfile

import lrsearch


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        job = {"name": "equiv",
               "task": {"kind": "image_classification", "model": "efficientnet-lite0", "dataset": "digits",
                        "image_size": 32, "num_train": 384, "num_val": 512, "batch_size": 32, "seed": 0},
               "space": {"family": "efficientnet"},
               "search": {"num_trials": 6, "max_epochs": 3, "max_concurrent_trials": 1, "seed": 0},
               "train": {"max_grad_norm": None},
               "storage": {"path": tmp}}
        res = lrsearch.search(job, track=False)
        rows = [{"config": t.config, "state": t.state.value, "metric": t.metric_per_epoch,
                 "train_loss": t.train_loss_per_epoch, "val_loss": t.val_loss_per_epoch} for t in res.trials]
        with open(out, "w") as f:
            json.dump({"bounds": res.range_test["bounds"], "best": res.best.value,
                       "trials": sorted(rows, key=lambda r: r["config"]["max_lr"])}, f, indent=1)
        print(f"best {res.best.value} in {res.seconds:.0f} s -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
