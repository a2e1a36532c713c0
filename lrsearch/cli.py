"""The ``lrsearch`` command line: a thin layer over the library.

Each command reads its options, calls one library function and prints the result (a rich table, or
one JSON object with ``--json``). Errors lrsearch raises on purpose become one line and exit code 2.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from lrsearch import __version__
from lrsearch.console import fail, out, print_json

app = typer.Typer(
    name="lrsearch",
    help="Find the learning-rate strategy for fine-tuning a pretrained network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _clear_errors(fn):
    """Turn lrsearch's own errors (and ValueErrors from validation) into one line, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lrsearch.errors import LRSearchError

        try:
            return fn(*args, **kwargs)
        except (LRSearchError, ValueError) as exc:
            fail(str(exc))

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"lrsearch {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Find the learning-rate strategy for fine-tuning a pretrained network."""


@app.command()
@_clear_errors
def schedules(
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of every schedule's curve.")] = None,
    total_steps: Annotated[int, typer.Option(help="Steps the plotted curves span.")] = 1000,
    max_lr: Annotated[float, typer.Option(help="Peak LR of the plotted curves.")] = 1e-3,
    json_: JsonOpt = False,
) -> None:
    """List the LR schedules with their parameters and defaults; optionally plot them."""
    from lrsearch.report import plot_schedules, schedules_table

    if plot is not None:
        plot_schedules(str(plot), total_steps=total_steps, max_lr=max_lr)
    if json_:
        from lrsearch.report import schedules_json

        print_json({"schedules": schedules_json(), "plot": str(plot) if plot else None})
        return
    out.print(schedules_table())
    if plot is not None:
        out.print(f"curves for total_steps={total_steps}, max_lr={max_lr:g} written to [bold]{plot}[/]")


@app.command()
@_clear_errors
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="A smaller run that finishes in seconds.")] = False,
    out_dir: Annotated[Path, typer.Option(help="Where results go.")] = Path("lrsearch-runs/demo"),
    json_: JsonOpt = False,
) -> None:
    """Run lrsearch on its embedded defaults: the LR range test on the built-in synthetic task."""
    from lrsearch.demo import run_demo

    summary = run_demo(quick=quick, out_dir=out_dir, show_progress=not json_)
    if json_:
        print_json(summary)
        return
    from lrsearch.report import range_test_table

    out.print(range_test_table(summary["range_test"], title=f"LR range test: {summary['task']}"))
    out.print(f"plot: [bold]{summary['plot']}[/]")
