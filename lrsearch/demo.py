"""``lrsearch demo``: the main job on the embedded defaults."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lrsearch.range_test import lr_range_test
from lrsearch.tasks import synthetic_task


def run_demo(*, quick: bool = False, out_dir: Path = Path("lrsearch-runs/demo"),
             show_progress: bool = True) -> dict[str, Any]:
    """Run the LR range test on the built-in synthetic task; write its plot and JSON to ``out_dir``."""
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir.mkdir(parents=True, exist_ok=True)
    task = synthetic_task(num_train=1024 if quick else 4096)
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    num_steps = 100 if quick else 200

    started = time.perf_counter()
    with Progress(TextColumn("range test"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("range", total=num_steps, info="")

        def report(step: int, total: int, lr: float, loss: float) -> None:
            progress.update(bar, completed=step, info=f"lr {lr:.2e}  loss {loss:.4f}")

        result = lr_range_test(model, optimizer, task.criterion, task.train_loader,
                               num_steps=num_steps, progress=report)
    data = result.to_dict()
    plot = result.plot(str(out_dir / "range_test.png"), title=f"LR range test: {task.name}")
    (out_dir / "range_test.json").write_text(json.dumps(data, indent=1))
    return {
        "task": task.name,
        "range_test": data,
        "suggestion": data["suggestions"]["valley"],
        "bounds": data["bounds"],
        "plot": plot,
        "results": str(out_dir / "range_test.json"),
        "seconds": round(time.perf_counter() - started, 2),
    }
