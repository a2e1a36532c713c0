"""The final run's Ray task: every candidate trained at the horizon by the engine, the best by
validation kept, scored once on the held-out test split, logged."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lrsearch.engine import (
    EpochEnd,
    Horizon,
    Training,
    checkpoint_state,
    cooldown_branch,
    fit,
    load_state,
    trainable_state,
)
from lrsearch.engine.protocol import trial_device
from lrsearch.engine.trial import TaskSource, build_run, loader_steps, metric_key, worst_value
from lrsearch.errors import SearchError
from lrsearch.final.found import Candidate
from lrsearch.final.state import CandidateReport, save_state
from lrsearch.optim.divergence import DivergenceMonitor
from lrsearch.optim.recipe import Stepper, autocast_for
from lrsearch.range_test.finder import measure
from lrsearch.tasks import Task, evaluate

__all__ = ["FinalSink", "Plan", "RangeTestPlan", "horizon_of", "train_on_worker"]


@dataclass(frozen=True)
class Plan:
    """What the Ray task trains: how (``training``), which configs, for how long (``epochs`` or
    ``steps``; neither: ``default_epochs``), and whether the candidates are halved on the way
    (``halving``: :func:`halving_rungs`) rather than each trained the whole horizon."""

    training: Training
    candidates: tuple[Candidate, ...]
    epochs: int | None
    steps: int | None
    default_epochs: int
    halving: bool = False
    range_test: RangeTestPlan | None = None


@dataclass(frozen=True)
class RangeTestPlan:
    """``--range-test``: no search; a range test of ``share`` of the run's optimizer steps on its
    task (``settings``: the job's ``range_test`` section) gives the LR, its :meth:`consensus
    <lrsearch.range_test.RangeTestResult.consensus>`. The candidates' ``max_lr`` are multiples of
    ``placeholder`` until then (``--lr-scales``)."""

    settings: Any
    placeholder: float
    share: float = 0.25


#: the shortest range test ``--range-test`` runs, whatever the horizon
MIN_RANGE_TEST_STEPS = 20

#: the fewest steps a decade of LR ``--range-test`` sweeps (fastai's 100 steps over 1e-7..10 are
#: 12.5). With fewer, each LR gets too few steps for the loss to answer, and the sweep reads high:
#: at 3 a decade (24 steps) it pointed 2-15x above the grid's best at 4x the trials' steps, at 12.5
#: within it on 2 tasks of 3 (BENCHMARKS.md)
MIN_STEPS_PER_DECADE = 12.5

#: a cooldown branch lasts this share of the optimizer steps before it (Hägele et al. 2024: a
#: cooldown of 10-20 % of the run scores as the schedule decayed over the whole run)
COOLDOWN_SHARE = 0.2


def range_test_steps(num_steps: int | str, share: float, total_steps: int, start_lr: float, end_lr: float) -> int:
    """``--range-test``'s sweep length: the job's ``range_test.num_steps`` where it gives one, else
    (``auto``) ``share`` of the run's optimizer steps, and at least :data:`MIN_STEPS_PER_DECADE` a
    decade of the sweep from ``start_lr`` to ``end_lr`` (100 steps over 1e-7..10)."""
    if num_steps != "auto":
        return int(num_steps)
    decades = math.log10(end_lr / start_lr)
    return max(MIN_RANGE_TEST_STEPS, round(share * total_steps), math.ceil(MIN_STEPS_PER_DECADE * decades - 1e-9))


def halving_rungs(candidates: int, epochs: int) -> list[tuple[int, int]]:
    """Where ``--halving`` compares ``candidates`` over a horizon of ``epochs``: ``(epoch, keep)``
    pairs. Each rung keeps the better half (at least one) by a cooldown branch's score; the last
    rung sits at a quarter of the horizon, each one before it at half the next, on epoch
    boundaries (at least epoch 1, before the last epoch). None for one candidate or one epoch."""
    if candidates < 2 or epochs < 2:
        return []
    keeps = []
    while candidates > 1:
        candidates = max(1, candidates // 2)
        keeps.append(candidates)
    rungs = []
    for i, keep in enumerate(keeps):
        fraction = 0.25 / 2 ** (len(keeps) - 1 - i)
        rungs.append((min(epochs - 1, max(1, round(epochs * fraction))), keep))
    return rungs


def horizon_of(task: Task, plan: Plan) -> Horizon:
    """The horizon in optimizer steps: ``steps``, or ``epochs`` (default: the search's
    ``max_epochs``) whole passes over the train loader."""
    per_epoch = loader_steps(task, plan.training.recipe.accumulation_steps)
    total = plan.steps if plan.steps is not None else per_epoch * (plan.epochs or plan.default_epochs)
    return Horizon(per_epoch, total)


def train_on_worker(source: TaskSource, plan: Plan, out: str, *, run=None, register: str | None = None,
                    tags: dict[str, str] | None = None, dry: bool = False) -> dict[str, Any]:
    """Train every candidate at the horizon, keep the best by validation, test it, log it.

    With ``dry`` only the horizon and the task's name (the task is built here, where it trains, so
    a bad ``--steps`` or accumulation fails before the MLflow run opens)."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    task = source.get()
    horizon = horizon_of(task, plan)
    if dry:
        return {"horizon": horizon, "task": task.name}
    device, out_dir = trial_device(), Path(out)
    state = json.loads((out_dir / "state.json").read_text())
    done: dict[str, dict[str, Any]] = state.setdefault("done", {})
    if plan.range_test is not None:
        plan = _from_range_test(plan, task, horizon, out_dir, device, run, state)
    prefixes = {c.trial_id: f"top{i + 1}." if len(plan.candidates) > 1 else "" for i, c in enumerate(plan.candidates)}
    alive, resumed_from = list(plan.candidates), 0
    if plan.halving:
        alive, resumed_from = _halve(plan, task, horizon, out_dir, device, run, state, prefixes)
    for cand in alive:
        if cand.trial_id in done:  # a resume: this one finished before the kill (its last epoch)
            resumed_from = max(resumed_from, done[cand.trial_id]["epochs"])
            continue
        report, start = train_one(plan.training, task, cand, horizon, out_dir, device, run, prefixes[cand.trial_id])
        resumed_from = max(resumed_from, start)
        done[cand.trial_id] = dict(report.to_dict(), rung_scores=state.get("rungs", {}).get(cand.trial_id, {}))
        save_state(out_dir, state)
    reports = {c.trial_id: CandidateReport.of(done[c.trial_id]) for c in plan.candidates}
    chosen = _choose(plan.candidates, reports, task, horizon, run)
    test, model_uri, registered = _test_and_log(plan, task, chosen, reports[chosen.trial_id], horizon, out_dir,
                                                device, run, register, tags)
    report = reports[chosen.trial_id]
    return {"test_metric": None if test is None else test[task.metric],
            "test_loss": None if test is None else test["loss"], "val_metric": report.val_metric,
            "metric": task.metric, "mode": task.mode, "model_uri": model_uri, "registered": registered,
            "trial_id": chosen.trial_id, "config": chosen.config,
            "candidates": [{"trial_id": c.trial_id, "search_value": c.search_value, **reports[c.trial_id].to_dict()}
                           for c in plan.candidates],
            "epochs": horizon.epochs, "total_steps": horizon.total_steps,
            "steps_per_epoch": horizon.steps_per_epoch, "resumed_from_epoch": resumed_from,
            "steps_trained": _steps_trained(reports.values(), horizon), "range_test": state.get("range_test")}


def _from_range_test(plan: Plan, task: Task, horizon: Horizon, out: Path, device: torch.device, run,
                     state: dict[str, Any]) -> Plan:
    """The plan with the range test's LR in its candidates: the test runs once (a resumed run
    reads it back from ``state``), and its figures go to the MLflow run."""
    spec, training = plan.range_test, plan.training
    found = state.get("range_test")
    if found is None:
        settings = spec.settings
        steps = range_test_steps(settings.num_steps, spec.share, horizon.total_steps, settings.start_lr, settings.end_lr)
        recipe = replace(training.recipe, accumulation_steps=spec.settings.accumulation_steps
                         or training.recipe.accumulation_steps)
        result = measure(task, training.optimizer, spec.settings, recipe, steps, seed=training.seed, device=device)
        low, high = result.bounds()
        found = {"steps": steps, "steps_run": len(result.lrs), "low": low, "high": high,
                 "suggestions": result.suggestions(), "max_lr": result.consensus()}
        state["range_test"] = found
        save_state(out, state)
        if run is not None:
            run.log(params={f"range_test.{k}": found[k] for k in ("steps", "steps_run", "low", "high", "max_lr")})
    lr = found["max_lr"]
    candidates = tuple(Candidate(c.trial_id, {**c.config, "max_lr": lr * c.config["max_lr"] / spec.placeholder},
                                 c.search_value) for c in plan.candidates)
    return replace(plan, candidates=candidates)


def _steps_trained(reports, horizon: Horizon) -> int:
    """The optimizer steps the run's candidates took (a diverged one's to the end of the epoch it
    diverged in), their cooldown branches included (none at a rung it diverged before)."""
    total = 0
    for report in reports:
        total += min(report.epochs * horizon.steps_per_epoch, horizon.total_steps)
        total += sum(branch_steps(int(epoch), horizon) for epoch in report.rung_scores
                     if not (report.diverged and int(epoch) >= report.epochs))
    return total


def branch_steps(epoch: int, horizon: Horizon) -> int:
    """The cooldown branch's optimizer steps after ``epoch`` epochs: COOLDOWN_SHARE of those done
    (at least 1, at most an epoch's)."""
    return min(horizon.steps_per_epoch, max(1, round(COOLDOWN_SHARE * epoch * horizon.steps_per_epoch)))


def _halve(plan: Plan, task: Task, horizon: Horizon, out: Path, device: torch.device, run,
           state: dict[str, Any], prefixes: dict[str, str]) -> tuple[list[Candidate], int]:
    """Successive halving at the horizon: every candidate trains towards the whole horizon (its own
    schedule) up to the first rung, where a cooldown branch scores it as if its run ended there;
    the better half goes on to the next rung, and so on (:func:`halving_rungs`). Returns the
    candidates left to finish and the epoch a resumed run continued from. What a rung decided is
    kept in ``state`` (``rungs``: the scores; ``done``: the candidates it stopped)."""
    done, rungs = state["done"], state.setdefault("rungs", {})
    alive, resumed_from = list(plan.candidates), 0
    sign = 1.0 if task.mode == "max" else -1.0
    for epoch, keep in halving_rungs(len(alive), horizon.epochs):
        for cand in alive:
            scores = rungs.setdefault(cand.trial_id, {})
            if str(epoch) in scores:  # a resume: scored before the kill
                continue
            prefix = prefixes[cand.trial_id]
            report, start = train_one(plan.training, task, cand, horizon, out, device, run, prefix, stop_at=epoch)
            resumed_from = max(resumed_from, start)
            score = worst_value(task) if report.diverged else _branch_score(plan, task, cand, horizon, out, device,
                                                                             epoch)
            scores[str(epoch)] = score
            if report.diverged:
                done[cand.trial_id] = dict(report.to_dict(), rung_scores=dict(scores))
            if run is not None:
                run.log(metrics={f"{prefix}halving_{metric_key(task)}": score}, step=epoch)
            save_state(out, state)
        ranked = sorted(alive, key=lambda c: sign * rungs[c.trial_id][str(epoch)], reverse=True)
        for cand in ranked[keep:]:
            if cand.trial_id not in done:
                score = rungs[cand.trial_id][str(epoch)]
                done[cand.trial_id] = CandidateReport(val_metric=score, val_loss=1e9, diverged=False, epochs=epoch,
                                                      rung_scores=dict(rungs[cand.trial_id])).to_dict()
            (out / f"{cand.trial_id}.pt").unlink(missing_ok=True)
        kept = {c.trial_id for c in ranked[:keep]}
        alive = [c for c in alive if c.trial_id in kept]
        save_state(out, state)
    return alive, resumed_from


def _branch_score(plan: Plan, task: Task, cand: Candidate, horizon: Horizon, out: Path, device: torch.device,
                  epoch: int) -> float:
    """The candidate's validation metric had its run ended after ``epoch`` epochs: a cooldown
    branch from its checkpoint there (:func:`lrsearch.engine.cooldown_branch`); the run itself
    goes on from the checkpoint, untouched."""
    training = plan.training
    torch.manual_seed(training.seed)
    model, optimizer, scheduler, _ = build_run(training.optimizer, task, cand.config, device, horizon.total_steps)
    stepper = Stepper(training.recipe, model, optimizer, task.criterion, device)
    monitor = training.monitor()
    load_state(torch.load(out / f"{cand.trial_id}.pt", map_location=device, weights_only=False), stepper, scheduler,
               monitor)
    scores = cooldown_branch(task, stepper, monitor, branch_steps(epoch, horizon), seed=training.seed, epoch=epoch)
    return worst_value(task) if scores is None else scores[task.metric]


def _choose(candidates: tuple[Candidate, ...], reports: dict[str, CandidateReport], task: Task, horizon: Horizon,
            run) -> Candidate:
    """The candidate with the best final validation score among those that reached the horizon
    without diverging (``--halving`` stops the others on the way)."""
    finished = [c for c in candidates if not reports[c.trial_id].diverged
                and reports[c.trial_id].epochs == horizon.epochs]
    if not finished:
        if run is not None:
            run.log(tags={"lrsearch.state": "diverged"})
        raise SearchError(f"the final run diverged for every config trained ({len(candidates)}): NaN or "
                          f"exploding loss at the {horizon.total_steps}-step horizon; try --top-k "
                          "with more configs, or a shorter horizon")
    return (max if task.mode == "max" else min)(finished, key=lambda c: reports[c.trial_id].val_metric)


def _test_and_log(plan: Plan, task: Task, chosen: Candidate, report: CandidateReport, horizon: Horizon,
                  out_dir: Path, device: torch.device, run, register: str | None,
                  tags: dict[str, str] | None) -> tuple[dict[str, float] | None, str | None, dict | None]:
    """The chosen weights scored once on the test split, saved as ``model.pt`` (the others'
    deleted), and logged with their scores to the MLflow run (a registry version with ``register``)."""
    model, _, _, _ = build_run(plan.training.optimizer, task, chosen.config, device, horizon.total_steps)
    model.load_state_dict(torch.load(out_dir / f"{chosen.trial_id}.final.pt", map_location=device,
                                     weights_only=False), strict=False)
    test = None
    if task.test_loader is not None:
        autocast = autocast_for(plan.training.recipe.precision, device)
        test = evaluate(model, task, device, loader=task.test_loader, autocast=autocast)
    torch.save(model.state_dict(), out_dir / "model.pt")
    for cand in plan.candidates:  # the others' weights are not needed any more
        if cand.trial_id != chosen.trial_id:
            (out_dir / f"{cand.trial_id}.final.pt").unlink(missing_ok=True)
    if run is None:
        return test, None, None
    # one config: its epochs logged these already; top-k: the chosen one's, unprefixed
    key = metric_key(task)
    final = {key: report.val_metric, "val_loss": report.val_loss} if len(plan.candidates) > 1 else {}
    if test is not None:
        final.update({f"test_{task.metric}": test[task.metric], "test_loss": test["loss"]})
    schedule = chosen.config["schedule"]
    run.log(metrics=final, step=horizon.epochs,
            params={"trial_id": chosen.trial_id, "max_lr": chosen.config["max_lr"], "schedule": schedule,
                    **{f"{schedule}.{k}": v for k, v in (chosen.config.get(schedule) or {}).items()}},
            tags={"lrsearch.state": "finished"})
    version_tags = {**(tags or {}), "trial_id": chosen.trial_id, "run_id": run.run_id,
                    "config": json.dumps(chosen.config, sort_keys=True, default=str),
                    f"val_{task.metric}": f"{report.val_metric:.6g}"}
    if test is not None:
        version_tags[f"test_{task.metric}"] = f"{test[task.metric]:.6g}"
    model_uri, registered = run.log_model(model.cpu().eval(), register=register, tags=version_tags,
                                          input_example=_input_example(task))
    return test, model_uri, registered


def _input_example(task: Task) -> Any:
    """Two validation inputs as a numpy array, for a model that takes one tensor (``None`` for
    models taking a mapping, such as Hugging Face ones: no example, no signature)."""
    inputs = next(iter(task.val_loader))[0]
    return inputs[:2].float().cpu().numpy() if isinstance(inputs, torch.Tensor) else None


def train_one(training: Training, task: Task, cand: Candidate, horizon: Horizon, out: Path,
              device: torch.device, run, prefix: str, stop_at: int | None = None) -> tuple[CandidateReport, int]:
    """One config over the horizon (:func:`lrsearch.engine.fit`), a checkpoint after each epoch,
    from its last checkpoint when there is one; with ``stop_at``, only up to that epoch (its
    checkpoint kept, to go on from). Returns its report and the epoch it started from."""
    torch.manual_seed(training.seed)
    model, optimizer, scheduler, _ = build_run(training.optimizer, task, cand.config, device, horizon.total_steps)
    stepper = Stepper(training.recipe, model, optimizer, task.criterion, device)
    monitor = training.monitor()
    ckpt, start = out / f"{cand.trial_id}.pt", 0
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        load_state(saved, stepper, scheduler, monitor)
        start = saved["epoch"]
    logged = run.logged_epochs(f"{prefix}{metric_key(task)}") if run is not None and start else 0
    sink = FinalSink(task, cand, horizon, out, run, prefix, logged, stepper, scheduler, monitor, stop_at)
    last = None
    if stop_at is None or start < stop_at:
        last = fit(task, stepper, scheduler, monitor, horizon, seed=training.seed, sink=sink, start_epoch=start)
    metrics = sink.metrics
    if not metrics and ckpt.is_file():  # resumed after its last epoch was saved
        metrics = torch.load(ckpt, map_location="cpu", weights_only=False).get("metrics", {})
    diverged = last is not None and last.diverged
    reached = max(start, last.epoch if last else 0) if diverged or stop_at is not None else horizon.epochs
    if not diverged and stop_at is None:
        torch.save(trainable_state(model), out / f"{cand.trial_id}.final.pt")
    if stop_at is None or diverged:
        ckpt.unlink(missing_ok=True)
    report = CandidateReport(val_metric=metrics.get(task.metric, worst_value(task)),
                             val_loss=metrics.get("loss", 1e9), diverged=diverged, epochs=reached)
    return report, start


class FinalSink:
    """The engine's epochs of one final-run candidate: logged to its MLflow run (``prefix``: which
    candidate), shown in ``progress.json``, checkpointed for ``--resume``."""

    def __init__(self, task: Task, cand: Candidate, horizon: Horizon, out: Path, run, prefix: str,
                 logged: int, stepper: Stepper, scheduler, monitor: DivergenceMonitor, stop_at: int | None = None) -> None:
        self.task, self.cand, self.horizon, self.out, self.run, self.prefix = task, cand, horizon, out, run, prefix
        self.logged, self.stepper, self.scheduler, self.monitor = logged, stepper, scheduler, monitor
        self.stop_at = stop_at  # --halving: the rung this stretch of the run ends at
        self.metrics: dict[str, float] = {}

    def replaying(self, epoch: int) -> bool:
        return False

    def end_epoch(self, end: EpochEnd) -> bool:
        prefix, key = self.prefix, metric_key(self.task)
        log = self.run is not None and end.epoch > self.logged  # killed after logging it, before its checkpoint
        if log:
            self.run.log(series=(f"{prefix}lr_step", end.lrs, (end.epoch - 1) * self.horizon.steps_per_epoch))
        if end.diverged:
            self.metrics = {"val_loss": 1e9, self.task.metric: worst_value(self.task)}
            if log:
                self.run.log(metrics={f"{prefix}train_loss": end.train_loss, f"{prefix}diverged": 1.0},
                             step=end.epoch)
            return True
        self.metrics = metrics = end.scores or {}
        if log:
            self.run.log(metrics={f"{prefix}{key}": metrics[self.task.metric], f"{prefix}val_loss": metrics["loss"],
                                  f"{prefix}train_loss": end.train_loss,
                                  f"{prefix}lr": max(g["lr"] for g in self.stepper.optimizer.param_groups)},
                         step=end.epoch)
        (self.out / "progress.json").write_text(
            f"final run: trial {self.cand.trial_id}{f' ({prefix[:-1]})' if prefix else ''}, epoch {end.epoch}/"
            f"{self.horizon.epochs}: train loss {end.train_loss:.4f}, {key} {metrics[self.task.metric]:.4f}")
        state = checkpoint_state(end.epoch, model=self.stepper.model, optimizer=self.stepper.optimizer,
                                 scheduler=self.scheduler, monitor=self.monitor, tracked={"stepper": self.stepper},
                                 metrics=metrics)
        ckpt = self.out / f"{self.cand.trial_id}.pt"
        torch.save(state, ckpt.with_suffix(".pt.tmp"))
        os.replace(ckpt.with_suffix(".pt.tmp"), ckpt)
        return self.stop_at is not None and end.epoch >= self.stop_at
