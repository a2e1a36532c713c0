"""Terminal output shared by the CLI commands: rich tables, progress, one-line errors."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

out = Console()
err = Console(stderr=True)


def print_json(data: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` on stderr and exit with ``code``; no traceback."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(code)
