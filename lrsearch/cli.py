"""The ``lrsearch`` command line: a thin layer over the library.

Each command reads its options, calls one library function and prints the result (a rich table, or
one JSON object with ``--json``). Errors lrsearch raises on purpose become one line and exit code 2.
"""

from __future__ import annotations

import functools
import shlex
from pathlib import Path
from typing import Annotated

import typer

import lrsearch
from lrsearch import __version__
from lrsearch.console import RangeTestProgress, err, fail, out, print_json
from lrsearch.errors import ConfigError, Interrupted, LRSearchError
from lrsearch.infra.tracking import heal, load_tracking_info
from lrsearch.job.extras import check_demo

app = typer.Typer(
    name="lrsearch",
    help="Find the learning-rate strategy for fine-tuning a pretrained network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
JobArg = Annotated[Path, typer.Argument(help="The job file (YAML).", show_default=False)]


def _clear_errors(fn):
    """Turn lrsearch's own errors (the user's to fix) into one line and their exit code (2; 130 for
    Ctrl+C). Anything else is a bug in lrsearch and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):

        try:
            return fn(*args, **kwargs)
        except Interrupted as exc:
            fail(str(exc), exc.exit_code, label="interrupted")
        except KeyboardInterrupt:
            fail("stopped by Ctrl+C", Interrupted.exit_code, label="interrupted")
        except LRSearchError as exc:
            fail(str(exc), exc.exit_code)

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
    from lrsearch.output.report import (  # torch: on use, for a fast --help
        plot_schedules,
        schedules_table,
    )

    if plot is not None:
        try:
            plot_schedules(str(plot), total_steps=total_steps, max_lr=max_lr)
        except ValueError as exc:  # the schedules library's message names the bad option

            raise ConfigError(str(exc)) from None
    if json_:
        from lrsearch.output.report import schedules_json  # torch: on use, for a fast --help

        print_json({"schedules": schedules_json(), "plot": str(plot) if plot else None})
        return
    out.print(schedules_table())
    if plot is not None:
        out.print(f"curves for total_steps={total_steps}, max_lr={max_lr:g} written to [bold]{plot}[/]")


@app.command("find-lr")
@_clear_errors
def find_lr_cmd(
    job_file: JobArg,
    plot: Annotated[Path | None, typer.Option(help="Where to write the plot [default: STORAGE/NAME/range_test.png].")] = None,
    json_: JsonOpt = False,
) -> None:
    """Run the LR range test on the job's task and print the suggestions and max_lr bounds."""
    from lrsearch.range_test.finder import (  # torch: on use, for a fast --help
        local_dir,
        range_test_summary,
    )

    job = lrsearch.load_job(job_file)
    # its length (range_test.num_steps: auto) is known once the task is built: the bar learns it
    with RangeTestProgress(100, enabled=not json_) as bar:
        result = lrsearch.find_lr(job, plot=plot, progress=bar.callback)
    summary = range_test_summary(local_dir(job.results_dir(), job.name), job.name, result, plot)
    if json_:
        print_json(summary)
        return
    _print_range_test(summary)


def _print_range_test(summary: dict) -> None:
    from lrsearch.output.report import range_test_table  # torch: on use, for a fast --help

    out.print(range_test_table(summary["range_test"], title=f"LR range test: {summary['task']}"))
    if summary["range_test"].get("warning"):
        out.print(f"[yellow]warning:[/] {summary['range_test']['warning']}", highlight=False)
    out.print(f"plot: [bold]{summary['plot']}[/]   data: {summary['results']}")


@app.command()
@_clear_errors
def search(
    job_file: JobArg,
    num_trials: Annotated[int | None, typer.Option(min=1, help="Override search.num_trials.")] = None,
    address: Annotated[str | None, typer.Option(help="Join a Ray cluster: auto, ray://HOST:10001 or HOST:6379.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted search from its storage directory.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs and tables.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Search the LR strategy: range test -> Optuna TPE + ASHA on Ray Tune -> best config."""

    job = lrsearch.load_job(job_file)
    again = f"lrsearch search {shlex.quote(str(job_file))} --resume" + (f" --address {address}" if address else "")
    _run_search(job, again, num_trials=num_trials, address=address, resume=resume, verbose=verbose, json_=json_)


def _run_search(job, again: str, *, json_: bool, **kwargs) -> None:
    from lrsearch.output.report import search_tables  # torch: on use, for a fast --help

    if not json_:
        s = job.search
        stopping = (f"ASHA from epoch {s.grace_period} (x{s.reduction_factor:g})" if s.early_stopping == "asha"
                    else "no early stopping")
        out.print(f"[bold]lrsearch search[/] {job.name!r}: {kwargs.get('num_trials') or s.num_trials} trials "
                  f"({s.algorithm.upper()}), up to {s.max_epochs} epochs each, {stopping}", highlight=False)
    try:
        result = lrsearch.search(job, show_progress=not json_, **kwargs)
    except Interrupted as exc:
        raise Interrupted(f"{exc}\ncontinue it with: {again}") from None
    if json_:
        print_json(result.summary())
        return
    for renderable in search_tables(result):
        out.print(renderable)
    budget = (result.progress or {}).get("budget")
    if budget:
        out.print(f"budget: {budget['spent']:g} of {budget['limit']:g} {budget['kind']} spent"
                  + ("; it stopped the search" if budget["exhausted"] else ""), highlight=False)


def parse_scales(text: str) -> tuple[float, ...] | str:
    """``--lr-scales 1,0.5,0.25`` -> ``(1.0, 0.5, 0.25)``, ``auto`` as is; one line naming the value otherwise."""

    if text.strip() == "auto":
        return "auto"
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--lr-scales: got {text!r}; allowed: auto, or comma-separated numbers > 0, the "
                          "multiples of each config's max_lr to train (e.g. 1,0.5,0.25)") from None


@app.command()
@_clear_errors
def train(
    job_file: JobArg,
    epochs: Annotated[int | None, typer.Option(help="Epochs to train (default: the search's max_epochs).")] = None,
    steps: Annotated[int | None, typer.Option(help="Or the run's length in optimizer steps.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Train the K best configs; keep the best by validation.")] = 1,
    lr_scales: Annotated[str, typer.Option("--lr-scales", help="Train each config at these multiples of its max_lr (e.g. 1,0.5,0.25) and keep the best by validation; auto: 1,0.5,0.25 when the run is >= 4x the steps the config was searched at, else 1.")] = "auto",
    halving: Annotated[bool | None, typer.Option("--halving/--no-halving", help="Start every config (--top-k x --lr-scales) and halve them on the way, by a short cooldown branch at a quarter of the horizon, instead of training each the whole horizon. Default: with --lr-scales auto, halve from 8x the searched steps.", show_default=False)] = None,
    range_test: Annotated[bool, typer.Option("--range-test", help="No search: a range test on the run's data (a quarter of the run, at least 12.5 steps a decade of LR) gives max_lr; the space's default schedule trains it once. About 1.2-2 final runs in all.")] = False,
    register: Annotated[str | None, typer.Option(help="Register the model in MLflow's Model Registry under this name.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Train from this search run (default: the job's latest search).")] = None,
    experiment: Annotated[str | None, typer.Option(help="Train from this experiment's latest search.")] = None,
    config: Annotated[Path | None, typer.Option(help="Train this config instead (a YAML/JSON file: max_lr, schedule, params; e.g. `lrsearch export`'s).")] = None,
    address: Annotated[str | None, typer.Option(help="Run on a Ray cluster: auto, ray://HOST:10001 or HOST:6379.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed final run from its last epoch.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Train the search's best config at your horizon; score it on the held-out test split; log the model."""
    from lrsearch.final.found import check_options  # torch: on use, for a fast --help

    if sum(x is not None for x in (run_id, experiment, config)) > 1:
        raise ConfigError("give at most one of --run-id ID, --experiment NAME and --config FILE")
    source = run_id or experiment
    if config is not None:
        import yaml

        try:
            source = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--config: cannot read {str(config)!r}: {str(exc).splitlines()[0]}") from None
        if not isinstance(source, dict):
            raise ConfigError(f"--config: {str(config)!r} holds no mapping; allowed: max_lr, schedule, params")
        from lrsearch.final.found import given_config  # torch: on use, for a fast --help

        given_config(source)  # a bad config: one line, before anything is printed
    scales = parse_scales(lr_scales)
    check_options(epochs, steps, top_k, register, True, scales,  # bad options: one line, nothing printed first
                  range_test=range_test, searched=source is not None)
    job = lrsearch.load_job(job_file)
    if not json_:
        horizon = f"{steps} steps" if steps else f"{epochs or job.search.max_epochs} epochs"
        of = ("the range test's LR" if range_test else f"the config in {str(config)!r}" if config is not None else "the best config of "
              + ("run " + run_id if run_id else "the latest search in "
                 + repr(experiment or job.tracking.experiment or job.name)))
        out.print(f"[bold]lrsearch train[/] {job.name!r}: {of}"
                  f"{f' (top {top_k})' if top_k > 1 else ''}"
                  f"{f' at {lr_scales} x max_lr' if scales != 'auto' and len(scales) > 1 else ''}"
                  f"{', halving' if halving else ', no halving' if halving is False else ''}, {horizon}",
                  highlight=False)
    result = lrsearch.train(job, source, epochs=epochs, steps=steps, top_k=top_k, lr_scales=scales, halving=halving,
                            range_test=range_test, register=register, resume=resume, address=address, show_progress=not json_)
    if json_:
        print_json(result.summary())
        return
    from lrsearch.output.report import final_lines  # torch: on use, for a fast --help

    for line in final_lines(result):
        out.print(line, highlight=False)


@app.command()
@_clear_errors
def export(
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment: export its latest search.")] = None,
    run_id: Annotated[str | None, typer.Option(help="A search's parent run id (or one of its trial runs), or a final run's: the config it trained.")] = None,
    format_: Annotated[str, typer.Option("--format", "-f", help="yaml | json | hf | torch")] = "yaml",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI [default: MLFLOW_TRACKING_URI or MLflow's sqlite:///mlflow.db].")] = None,
) -> None:
    """Export the best config of a search from MLflow in a form a training script uses directly."""

    if (experiment is None) == (run_id is None):
        raise ConfigError("give exactly one of --experiment NAME or --run-id ID")
    text, note = lrsearch.export(experiment=experiment, run_id=run_id, tracking_uri=tracking_uri,
                                 format=format_)
    if output is not None:
        output.write_text(text)
        out.print(f"wrote {output}", highlight=False)
    else:
        import sys

        sys.stdout.write(text)
    if note:

        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


@app.command()
@_clear_errors
def sync(
    results: Annotated[Path, typer.Argument(help="A search's results directory (STORAGE/NAME).", show_default=False)],
) -> None:
    """Log to MLflow what a search could not log while the tracking server was down (every lrsearch
    command on the job does this first)."""

    info = load_tracking_info(str(results))
    pending = heal(results)
    if pending:
        fail(f"{pending} logging operations still pending: {info.uri} is not reachable; run lrsearch sync again later", 1)
    out.print(f"all logged to {info.uri} (parent run {info.parent_run_id})", highlight=False)


AddressOpt = Annotated[str, typer.Option(help="The Ray dashboard URL, e.g. http://HEAD:8265.", show_default=False)]


@app.command()
@_clear_errors
def submit(
    job_file: JobArg,
    address: AddressOpt,
    wait: Annotated[bool, typer.Option("--wait", help="Stream the logs until the job ends; fail if it fails.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Run `lrsearch search --resume` (continue an interrupted search).")] = False,
    train_: Annotated[bool, typer.Option("--train", help="Submit `lrsearch train` (the final run) instead of the search.")] = False,
    epochs: Annotated[int | None, typer.Option(help="With --train: epochs to train.")] = None,
    steps: Annotated[int | None, typer.Option(help="With --train: optimizer steps to train.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="With --train: train the K best configs.")] = None,
    lr_scales: Annotated[str | None, typer.Option("--lr-scales", help="With --train: train at these multiples of max_lr (default auto).")] = None,
    halving: Annotated[bool | None, typer.Option("--halving/--no-halving", help="With --train: halve the configs on the way, or not (default: lrsearch train's).", show_default=False)] = None,
    register: Annotated[str | None, typer.Option(help="With --train: register the model under this name.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Submit the search (or, with --train, its final run) to a Ray cluster; the same job twice is one."""
    from lrsearch.final.found import check_options  # torch: on use, for a fast --help
    from lrsearch.infra import jobs  # torch: on use, for a fast --help

    extra = ["--resume"] if resume else []
    if lr_scales is not None:
        check_options(None, None, 1, None, True, parse_scales(lr_scales))  # before anything is submitted
    train_options = {"--epochs": epochs, "--steps": steps, "--top-k": top_k, "--lr-scales": lr_scales,
                     "--register": register, "--no-halving" if halving is False else "--halving": halving is not None or None}
    if not train_ and any(v is not None for v in train_options.values()):
        given = ", ".join(k for k, v in train_options.items() if v is not None)
        raise ConfigError(f"{given}: only with --train (they set the final run)")
    for flag, value in train_options.items():
        if value is True:
            extra.append(flag)
        elif value is not None:
            extra += [flag, str(value)]
    info = jobs.submit(job_file, address, extra_args=extra or None, command="train" if train_ else "search")
    if json_ and not wait:
        print_json(info)
        return
    if not json_:
        verb = "already submitted" if info["already_submitted"] else "submitted"
        out.print(f"{verb}: [bold]{info['submission_id']}[/] ({info['status']})\n"
                  f"dashboard: {info['dashboard']}\nMLflow experiment: {info['experiment']}", highlight=False)
    if wait:
        import sys

        def show(text: str) -> None:
            if not json_:
                sys.stdout.write(text)
                sys.stdout.flush()

        status = jobs.wait_for_job(address, info["submission_id"], show)
        info["status"] = status
        if json_:
            print_json(info)
        else:
            out.print(f"job {info['submission_id']}: [bold]{status}[/]", highlight=False)
        if status != "SUCCEEDED":
            raise typer.Exit(1)


jobs_app = typer.Typer(help="List, inspect, follow and stop submitted searches.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
@_clear_errors
def jobs_list(address: AddressOpt, json_: JsonOpt = False) -> None:
    """The cluster's jobs; for each search: trials done, the best so far, the budget spent."""
    from rich.table import Table

    from lrsearch.infra.jobs import list_jobs  # torch: on use, for a fast --help
    from lrsearch.output.report import progress_cells  # torch: on use, for a fast --help

    rows = list_jobs(address)
    if json_:
        print_json({"jobs": rows})
        return
    table = Table(title=f"jobs at {address}")
    for col in ("submission_id", "job", "status", "trials", "best", "spent", "entrypoint"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["submission_id"]), str(r["job"] or "-"), r["status"], *progress_cells(r["progress"]),
                      r["entrypoint"])
    out.print(table)


@jobs_app.command("status")
@_clear_errors
def jobs_status(job_id: Annotated[str, typer.Argument(show_default=False)], address: AddressOpt,
                json_: JsonOpt = False) -> None:
    """One job's status; for a search: trials done, the best so far, the budget spent and left, the
    forecast end."""
    from lrsearch.infra.jobs import job_status, progress_text  # torch: on use, for a fast --help

    info = job_status(address, job_id)
    if json_:
        print_json(info)
    else:
        out.print(f"{job_id}: [bold]{info['status']}[/] {info['message'] or ''}", highlight=False)
        if info["progress"]:
            out.print(progress_text(info["progress"]), highlight=False)


@jobs_app.command("logs")
@_clear_errors
def jobs_logs(job_id: Annotated[str, typer.Argument(show_default=False)], address: AddressOpt,
              follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False) -> None:
    """A job's logs."""
    import sys

    from lrsearch.infra.jobs import job_logs, wait_for_job  # torch: on use, for a fast --help

    if follow:
        wait_for_job(address, job_id, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    else:
        sys.stdout.write(job_logs(address, job_id))


@jobs_app.command("stop")
@_clear_errors
def jobs_stop(job_id: Annotated[str, typer.Argument(show_default=False)], address: AddressOpt) -> None:
    """Stop a running job."""
    from lrsearch.infra.jobs import stop_job  # torch: on use, for a fast --help

    stopped = stop_job(address, job_id)
    out.print(f"{job_id}: {'stop requested' if stopped else 'was not running'}", highlight=False)


@app.command()
@_clear_errors
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="A smaller run (a few minutes on 2 CPU cores).")] = False,
    out_dir: Annotated[Path, typer.Option(help="Where results go.")] = Path("lrsearch-runs"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted demo.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs and tables.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Run the whole pipeline on the embedded defaults: MiniLM-L6 fine-tuned on fortunes categories.

    LR range test -> Optuna TPE + ASHA search on a local Ray -> best config, offline on CPU.
    """
    import shutil

    from lrsearch.demo import demo_job  # torch: on use, for a fast --help

    job = demo_job(quick=quick, storage=str(out_dir))
    check_demo(job.task)  # what is missing, in one line: the demo's extra and its model wheel
    if not resume and Path(job.results_dir()).exists():
        shutil.rmtree(job.results_dir())  # the demo starts afresh; real searches never delete
    if not json_:
        t = job.task
        out.print(f"[bold]lrsearch demo[/]: {t.model} on fortunes {t.categories}, {t.num_train} training texts")
    again = "lrsearch demo --resume" + (" --quick" if quick else "") + (f" --out-dir {shlex.quote(str(out_dir))}" if out_dir != Path("lrsearch-runs") else "")
    _run_search(job, again, json_=json_, resume=resume, verbose=verbose)
    job_file = Path(job.results_dir()) / "job.yaml"
    if not json_ and job_file.is_file():
        rel = job_file.relative_to(Path.cwd()) if job_file.is_relative_to(Path.cwd()) else job_file
        out.print(f"next: train the best config at twice the horizon, scored on held-out test texts and logged "
                  f"to MLflow (from 4x the search's steps it also tries 0.5x and 0.25x its max_lr and keeps the "
                  f"best by validation, since a longer run often wants a lower LR):\n  lrsearch train {shlex.quote(str(rel))} --epochs "
                  f"{2 * job.search.max_epochs} --register {job.name}", highlight=False)
