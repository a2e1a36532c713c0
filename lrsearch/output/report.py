"""Tables and plots shown to users (rich renderables and PNG files)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from lrsearch.infra.tracking.store import is_default_store
from lrsearch.optim.schedules import SCHEDULES, lr_curve


def schedules_json() -> list[dict[str, Any]]:
    """Every schedule with its parameters, defaults and allowed values."""
    return [
        {
            "name": s.name,
            "summary": s.summary,
            "reference": s.reference or None,
            "params": [
                {"name": p.name, "default": p.default_doc, "allowed": p.allowed(), "doc": p.doc}
                for p in s.params
            ],
        }
        for s in SCHEDULES.values()
    ]


def schedules_table() -> Table:
    table = Table(title="LR schedules (the optimizer's lr is the peak, max_lr)", show_lines=True)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("what it does")
    table.add_column("parameters (default)")
    for s in SCHEDULES.values():
        params = "\n".join(f"{p.name} = {p.default_doc}" for p in s.params) or "-"
        what = s.summary + (f"\n[dim]same as {s.reference}[/]" if s.reference else "")
        table.add_row(s.name, what, params)
    return table


def plot_schedules(path: str, *, total_steps: int = 1000, max_lr: float = 1e-3) -> str:
    """Write a PNG with every schedule's LR curve, one panel each, at its default parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SCHEDULES)
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), sharex=True)
    try:
        for ax, name in zip(axes.flat, names, strict=False):
            ax.plot(lr_curve(name, total_steps, max_lr), color="C0")
            ax.set_title(name, fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"lrsearch schedules, defaults (total_steps={total_steps}, max_lr={max_lr:g})")
        fig.supxlabel("optimizer step")
        fig.supylabel("learning rate")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def range_test_table(data: dict[str, Any], title: str = "LR range test") -> Table:
    """Suggestions and bounds of a ``RangeTestResult.to_dict()``."""
    table = Table(title=title)
    table.add_column("what", style="bold")
    table.add_column("learning rate", justify="right")
    for method, lr in data["suggestions"].items():
        table.add_row(f"suggestion: {method}", "-" if lr is None else f"{lr:.3g}")
    low, high = data["bounds"]
    table.add_row("[green]max_lr search bounds[/]", f"[green]{low:.3g} .. {high:.3g}[/]")
    stopped = data["stop_reason"]
    if data.get("diverged_lr") is not None:
        stopped += f" at lr {data['diverged_lr']:.3g}"
    table.caption = f"{len(data['lrs'])} steps, {stopped}"
    return table


def _fmt_params(params: dict[str, Any], digits: int = 3) -> str:
    return ", ".join(f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items()) or "-"


def search_tables(result: Any, top: int = 10) -> list[Any]:
    """The best trials, the counts, what mattered, the best config and where the files are."""
    reverse = result.mode == "max"
    ranked = sorted(
        (t for t in result.trials if t.final_metric is not None),
        key=lambda t: (t.state.value != "completed", -t.final_metric if reverse else t.final_metric),
    )
    # 80 columns hold it: light borders, one schedule parameter a line (the params column wraps
    # where the others keep their width), the stopping epoch in the state ("pruned @1")
    table = Table(title=f"best trials by {result.metric} ({result.mode})", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for col in ("trial", "schedule", "max_lr", "params", "state", result.metric):
        table.add_column(col, justify="right" if col in ("max_lr", result.metric) else "left",
                         no_wrap=col != "params", overflow="fold" if col == "params" else "ellipsis")
    for t in ranked[:top]:
        table.add_row(t.trial_id, t.schedule or "-", f"{t.max_lr:.3g}" if t.max_lr else "-",
                      _fmt_params(t.params).replace(", ", "\n"),
                      t.state.value if t.state.value == "completed" else f"{t.state.value} @{t.stopped_at_epoch}",
                      f"{t.final_metric:.4f}")
    c = result.counts
    table.caption = (f"{c['total']} trials: {c['completed']} completed, {c['pruned']} pruned early, "
                     f"{c['diverged']} diverged, {c['errored']} errored; {result.seconds:.0f} s")
    parts: list[Any] = [table]
    if result.importances:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in result.importances.items())
        parts.append(f"what mattered (Optuna fANOVA importance over completed trials): {shown}")
    if result.warm_start:
        parts.append(escape(warm_start_line(result.warm_start)))
    if result.best is not None:
        b = result.best
        parts.append(f"[bold green]best:[/] {b.schedule} max_lr={b.max_lr:.3g} ({_fmt_params(b.params, 4)}) "
                     f"-> {result.metric} {b.value:.4f}")
    else:
        parts.append("[bold yellow]no trial completed its full budget[/]")
    paths = {k: escape(v) for k, v in result.paths.items()}  # paths are text, not markup
    if "best_config" in paths:
        exp = f" (or: lrsearch export --experiment {result.experiment} --format hf|torch)" if result.experiment else ""
        parts.append(f"best config: {paths['best_config']}{exp}")
    parts.append(f"results:     {paths['results']}/  (trials.parquet, summary.json, tune/)")
    if "optuna_study" in paths:
        parts.append(f"study:       optuna-dashboard {paths['optuna_study']}")
    if result.tracking:
        uri = escape(result.tracking["uri"])
        pending = paths.get("mlflow_pending", "0")
        note = "" if pending == "0" else (f"  [yellow]{pending} logging operations pending: lrsearch sync "
                                          f"{paths['results']} (the next lrsearch command on this job runs it)[/]")
        parts.append(f"MLflow:      {uri}, run {result.tracking['run_id']}{note}")
        if is_default_store(result.tracking["uri"]):  # MLflow's default store here: a bare mlflow ui shows it
            parts.append("             see it: mlflow ui --host 127.0.0.1")
        elif not uri.startswith(("http://", "https://")):
            parts.append(f"             see it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return parts


def dropped_text(report: dict[str, Any]) -> str:
    """The trials a report left out, by reason: ``2 schedule 'step' not in this space, 1 errored``."""
    reasons: Counter[str] = Counter()
    for source in report["sources"]:
        reasons.update(source["dropped"])
    return ", ".join(f"{n} {why}" for why, n in reasons.most_common()) or "none"


def warm_start_line(report: dict[str, Any]) -> str:
    """``search.warm_start``: the trials reused from which searches, and those dropped, by reason."""
    sources = "; ".join(f"{s['reused']} of {s['trials']} from {s['ref']!r} ({s['completed']} completed, "
                        f"{s['pruned'] + s['diverged']} pruned or diverged)" for s in report["sources"])
    dropped = f"; dropped {report['dropped']}: {dropped_text(report)}" if report["dropped"] else ""
    return f"warm start: seeded {report['reused']} trials: {sources}{dropped}"


def final_lines(result: Any) -> list[str]:
    """What ``lrsearch train`` prints: the config trained, its scores, where the model is."""
    c, m = result.config, result.metric
    params = _fmt_params(c.get(c["schedule"]) or {}, 4)
    what = {"config": "the given config", "range_test": "the range test's LR"}.get(result.trial_id,
                                                                                  f"trial {result.trial_id}")
    lines = [f"trained {what}: {c['schedule']} max_lr={c['max_lr']:.3g} ({params}) for "
             f"{result.epochs} epochs ({result.total_steps} optimizer steps)"
             + (f", resumed from epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else "")]
    if len(result.candidates) > 1:
        shown = ", ".join(f"{x['trial_id']} " + ("diverged" if x["diverged"] else f"{x['val_metric']:.4f}"
                          + (f" (halved out at epoch {x['epochs']}, a cooldown branch's score)"
                             if x["epochs"] < result.epochs else ""))
                          for x in result.candidates)
        lines.append(f"{len(result.candidates)} configs at this horizon, val_{m}: {shown} (kept the best)")
    test = "no test split (the task has no test_loader)" if result.test_metric is None else \
        f"test_{m} {result.test_metric:.4f} (held out: the {'range test' if result.range_test else 'search'} never saw it)"
    lines.append(f"val_{m} {result.val_metric:.4f}, {test}")
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.run_id:
        lines.append(f"MLflow run:  {result.run_id}"
                     + (f" (nested under search {result.search_run_id})" if result.search_run_id else ""))
    if result.run_id:
        import shlex

        lines.append(f"its config:  lrsearch export --run-id {result.run_id} --tracking-uri "
                     f"{shlex.quote(result.tracking_uri or '')} --format hf   (or yaml, json, torch)")
    if result.model_uri:
        lines.append(f"model:       {result.model_uri}")
        uri = result.registered["uri"] if result.registered else result.model_uri
        lines.append(f"load it:     mlflow.set_tracking_uri({result.tracking_uri!r}); "
                     f"mlflow.pytorch.load_model({uri!r})")
    if result.registered:
        lines.append(f"registered:  {result.registered['name']} version {result.registered['version']}")
    lines.append(f"weights:     {result.paths['model']}")
    return lines


def plot_search(trials: list[Any], path: str, metric: str) -> str:
    """Final metric against trial number, coloured by schedule type; pruned/diverged marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = sorted({t.schedule for t in trials if t.schedule})
    colours = {s: f"C{i % 10}" for i, s in enumerate(schedules)}
    markers = {"completed": "o", "pruned": "v", "diverged": "x", "errored": "s"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        seen = set()
        for i, t in enumerate(trials):
            if t.final_metric is None or t.state.value == "diverged":
                continue
            label = t.schedule if t.schedule not in seen else None
            seen.add(t.schedule)
            ax.scatter(i, t.final_metric, color=colours.get(t.schedule, "k"),
                       marker=markers.get(t.state.value, "o"), label=label, s=40)
        diverged = [i for i, t in enumerate(trials) if t.state.value == "diverged"]
        if diverged:
            ax.scatter(diverged, [ax.get_ylim()[0]] * len(diverged), color="red", marker="x", label="diverged")
        ax.set_xlabel("trial (order started)")
        ax.set_ylabel(metric)
        ax.set_title("lrsearch trials (o completed, v pruned early)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_lr_curves(trials: list[Any], path: str, total_steps: int, top: int = 5) -> str:
    """The LR curves of the best ``top`` completed trials over their whole budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for t in trials[:top]:
            curve = lr_curve(t.schedule, total_steps, t.max_lr, **t.schedule_params)
            ax.plot(curve, label=f"{t.trial_id} {t.schedule} ({t.final_metric:.4f})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"LR schedules of the top {min(top, len(trials))} trials")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def progress_cells(p: dict | None) -> tuple[str, str, str]:
    """Trials done of total, the best so far, the budget spent (``-`` before the first trial ends)."""
    if not p:
        return "-", "-", "-"
    best = "-" if p["best"] is None else f"{p['metric']} {p['best']:.4f}"
    b = p["budget"]
    spent = f"{b['spent']:g} / {b['limit']:g} {b['kind']}" if b else f"{p['trial_epochs']} trial_epochs"
    return f"{p['trials_done']}/{p['num_trials']}", best, spent
