"""Terminal output shared by the CLI commands: rich tables, progress, one-line errors."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

from lrsearch.redact import redact_uri

out = Console()
err = Console(stderr=True)


def print_json(data: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2, label: str = "error") -> None:
    """Print ``error: message`` (or another label) on stderr and exit with ``code``; no traceback."""
    colour = "bold red" if label == "error" else "bold yellow"
    for line in redact_uri(message).splitlines() or [""]:  # a URI's login never reaches the terminal
        err.print(f"[{colour}]{label}:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


class RangeTestProgress:
    """A rich progress bar for the range test; ``callback`` fits ``lr_range_test(progress=...)``."""

    def __init__(self, total: int, label: str = "range test", enabled: bool = True) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn(label), BarColumn(), TextColumn("{task.fields[info]}"),
                                  TimeElapsedColumn(), console=err, disable=not enabled, transient=True)
        self._bar = self._progress.add_task(label, total=total, info="")

    def __enter__(self) -> RangeTestProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def callback(self, step: int, total: int, lr: float, loss: float) -> None:
        self._progress.update(self._bar, completed=step, total=total, info=f"lr {lr:.2e}  loss {loss:.4f}")
