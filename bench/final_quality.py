"""What users take home: each method's chosen config trained at the final horizon, scored on test.

For every task, method and seed: the method's search at ``B`` = 18 trial-epochs (the jobs of
``bench/search_quality.py``: lrsearch as shipped, the hand-wired TPE + ASHA peer and random search
over a wide prior), then its chosen config trained by ``lrsearch.train`` on 4x the search's
training data for the same 3 epochs (4x a trial's optimizer steps), and scored once on a held-out
test split of 1500 examples that no search saw (one accuracy's standard error <= 0.013). Methods
without a search train one config at that horizon through the same ``lrsearch.train(job,
search=config)``:

- ``hf_default``: AdamW 5e-5, linear decay, no warmup, weight decay 0 (``TrainingArguments``);
- ``schedulefree``: ``optimizer.name: adamw_schedulefree`` at the package's defaults (lr 2.5e-3,
  betas (0.9, 0.999), weight decay 0) with a 5 % warmup (its README's advice), constant after;
- ``lrsearch_sf``: lrsearch with the ``schedule_free`` arm in its space (``bench/spaces/``);
- ``lrsearch_constant``, ``peer_constant``, ``random_constant``: those searches on the bert space as
  it shipped until 2026-12-02, with ``constant`` where ``wsd`` is now
  (``bench/spaces/bert_constant.yaml``; text tasks only). This benchmark is why ``wsd`` replaced
  ``constant``; those records ran as ``lrsearch``, ``peer`` and ``random`` then (a record holds the
  space it ran on; a re-keyed one also names its first file: ``rekeyed_from``);
- ``peer_short``, ``peer_short_lrscale``: the peer at lrsearch_short's budget (B = 6), then the same
  bridge: does the bridge make the win without the range test's bounds?
- ``family_default``: the family space's default schedule at the geometric middle of its prior;
- ``table3``: the seed document's LR table, three final runs (BERT-like 2e-5, 3.2e-5, 5e-5;
  EfficientNet-like 1e-4, 2.2e-4, 5e-4; linear decay, warmup 10 %), the best by validation;
- ``one_epoch_topk`` (Egele et al. 2023): 12 random configs over the peers' wide prior trained one
  epoch each, the top 2 trained at the horizon, the best by validation;
- ``lrsearch_short_halving`` / ``_halving_down``: lrsearch_short's best config at 2x, 1x, 0.5x (or
  1x, 0.5x, 0.25x) its max_lr, halved at the horizon (``lrsearch train --halving``: a cooldown
  branch scores each at a quarter of the horizon, rounded to an epoch; the best goes on);
- ``rt_horizon``: no search; the range test alone on the final run's data, a quarter of its
  optimizer steps long ("a range test that knows the final horizon"), and its consensus LR (what
  lrsearch trains first) trained once at the horizon with the family's default schedule;
  ``rt_horizon_mean``: the same without the / 3 (the suggestions' geometric mean itself);
- ``grid`` (oracle): final runs at 5 LRs x 2 schedules (linear and cosine, warmup 10 %), a
  half-decade apart around each family's usual range; reported by its best test score (an upper
  bound no user gets) and by its best validation score.

Two horizons (``--scales``): 4x a trial's optimizer steps (4x its data, the same epochs) and 16x;
``digits`` (batches of 4, 1200 final steps at 16x) reaches 16x on 4x its data for 4x the epochs.

Compute is in trial-epochs of the search's task: the search (range test included, as
``bench/search_quality.py`` charges it) plus the final run (its optimizer steps / the search's
steps per epoch: 12 here). The final run is part of every method's bill.

Everything is a call of the public API (``lrsearch.search``, ``lrsearch.train``); one local Ray
serves a whole process. Each (task, method, seed) is one JSON record under
``bench/results/final_quality/`` (committed; a rerun skips what is there, so it resumes and can be
split across processes: ``--tasks image`` in one, ``--tasks text`` in another).

Usage::

    .venv/bin/python bench/final_quality.py --tasks image --seeds 5
    .venv/bin/python bench/final_quality.py --report-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_quality as sq  # noqa: E402  (the search jobs and their summaries)

import lrsearch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / "results" / "final_quality"
REPORT = ROOT / "bench" / "results" / "final_quality.md"
BUDGET = 18.0
SCALE = 4  # the final run's optimizer steps over a trial's (its data: SCALE x a trial's)
#: the horizons measured: ``{scale: how it is reached}``; a task whose data runs out before the
#: data alone gets there trains more epochs (``EPOCHS_X``)
SCALES = (4, 16)
NUM_TEST = 1500
TIE = 0.005
#: ``{variant: (method, suffix)}``: the method on a variant of the family space,
#: ``bench/spaces/{family}_{suffix}.yaml`` (the ``_constant`` ones: text tasks only; ``_linear``: image only)
VARIANTS = {"lrsearch_sf": ("lrsearch", "schedule_free"), "lrsearch_constant": ("lrsearch", "constant"),
            "peer_constant": ("peer", "constant"), "random_constant": ("random", "constant"),
            "lrsearch_short_linear": ("lrsearch", "linear")}
#: ``{method: (base method, budget)}``: a search at another budget.
#: - ``lrsearch_short``: lrsearch's at a smaller one, so that its search plus the three final runs
#:   of ``lrsearch_short_lrscale`` cost about what the peer's search plus one final run does;
#: - ``*_matched``: the peer's and random search's at the budget that brings their search plus
#:   final run to ``lrsearch_short_lrscale``'s total (about 49 trial-epochs): equal compute exactly
#: - ``peer_short``: the peer at lrsearch_short's budget, so that ``peer_short_lrscale`` (it plus the
#:   bridge) asks whether the bridge alone makes the win, without the range test's bounds
SHORT = {"lrsearch_short": ("lrsearch", 6.0), "lrsearch_short_linear": ("lrsearch", 6.0),
         "peer_matched": ("peer", 21.0), "random_matched": ("random", 33.0), "peer_short": ("peer", 6.0)}
SEARCHES = tuple(dict.fromkeys(("lrsearch", "peer", "random", *VARIANTS, *SHORT)))
SINGLE = ("hf_default", "schedulefree", "family_default")
#: lrsearch's search, then its top 3 completed configs trained at the final horizon and the best by
#: validation kept (``lrsearch train --top-k 3``): built from the ``lrsearch`` / ``lrsearch_sf``
#: record (its top-1 final run is reused; the search is not run again)
TOP3 = {"lrsearch_top3": "lrsearch", "lrsearch_sf_top3": "lrsearch_sf", "lrsearch_lrscale": "lrsearch",
        "lrsearch_short_lrscale": "lrsearch_short", "lrsearch_short_linear_lrscale": "lrsearch_short_linear",
        "peer_short_lrscale": "peer_short"}
#: the horizon bridge: lrsearch's best config trained at the final horizon at these multiples of its
#: max_lr (the 1x run reused), the best by the final run's validation kept. A longer run's best LR
#: sits lower (the text grid), so the candidates only go down
LR_SCALES = {m: (1.0, 0.5, 0.25) for m in ("lrsearch_lrscale", "lrsearch_short_lrscale", "lrsearch_short_linear_lrscale",
                                                 "peer_short_lrscale")}
#: successive halving at the final horizon (``lrsearch train --lr-scales ... --halving``): the base
#: method's best config at these multiples of its max_lr all start the final run; at a quarter of
#: the horizon a cooldown branch scores each, and the best goes on (the base record's search reused)
HALVING = {"lrsearch_short_halving": ("lrsearch_short", (2.0, 1.0, 0.5)),
           "lrsearch_short_halving_down": ("lrsearch_short", (1.0, 0.5, 0.25))}
#: no search: the range test alone, run on the final run's data for this share of the final run's
#: optimizer steps ("a range test that knows the final horizon"), its consensus LR (the suggestions'
#: geometric mean / 3, clipped into its bounds: what lrsearch trains first) trained once at the
#: horizon with the family's default schedule
RANGE_ONLY = {"rt_horizon": 0.25, "rt_horizon_mean": 0.25, "rt_steps100": 0.25}
#: ``rt_steps100``: ``lrsearch train --range-test`` with the job's ``range_test.num_steps: 100``
#: (fastai's sweep length, 12.5 steps a decade over 1e-7..10) whatever the horizon: does a sweep of
#: a quarter of a short run (24 steps at 4x) read high for its few steps a decade?
RANGE_STEPS = {"rt_steps100": 100}
#: ``rt_horizon_mean``: the suggestions' geometric mean itself. The / 3 corrects a short sweep
#: towards a longer run; a sweep a quarter of the run long may not need it
RANGE_DIVIDE = {"rt_horizon_mean": 1.0, "rt_steps100": 1.0}
#: the seed document's table (``../shared``'s LR table): three runs at the family's usual LRs, linear
#: decay, warmup 10 %, the best by the final run's validation kept
TABLE3 = {"bert": (2e-5, 3.2e-5, 5e-5), "efficientnet": (1e-4, 2.2e-4, 5e-4)}
#: Egele et al. 2023 ("Is one epoch all you need?"): ONE_EPOCH_N random configs over the peers' wide
#: prior, each trained for one epoch (its schedule over that epoch), the top ONE_EPOCH_K by
#: validation trained at the final horizon, the best of those by the final run's validation kept
ONE_EPOCH_N, ONE_EPOCH_K = 12, 2
#: methods whose record holds several final runs, one kept by the final run's validation
PICK_BY_VAL = ("table3", "one_epoch_topk")
METHODS = tuple(dict.fromkeys(("lrsearch", "peer", "random", *SINGLE, "table3", "one_epoch_topk", "grid",
                               *VARIANTS, *SHORT, *TOP3, *HALVING, *RANGE_ONLY)))

#: search-time tasks; the final run takes SCALE x num_train. fortunes categories with >= 1050
#: entries, so that train, validation and 1500 test texts fit
TASKS: dict[str, dict[str, Any]] = {
    "image": {"kind": "image_classification", "model": "efficientnet-lite0", "dataset": "fashion_mnist",
              "image_size": 32, "num_train": 256, "num_val": 256, "batch_size": 32},
    "text": {"kind": "text_classification", "model": "minilm-l6", "dataset": "fortunes",
             "categories": ["people", "definitions", "cookie", "computers"], "num_train": 128,
             "num_val": 192, "max_length": 32, "batch_size": 16},
    "text2": {"kind": "text_classification", "model": "minilm-l6", "dataset": "fortunes",
              "categories": ["people", "computers"], "num_train": 128, "num_val": 192,
              "max_length": 32, "batch_size": 16},
}
# digits: a task with long final runs (batches of 4: 75 optimizer steps a trial, 1200 at 16x), whose
# 1797 images run out before 16x the data: its 16x horizon is 4x the data for 4x the epochs
TASKS["digits"] = {"kind": "image_classification", "model": "efficientnet-lite0", "dataset": "digits",
                   "image_size": 32, "num_train": 100, "num_val": 192, "batch_size": 4}
FAMILY = {"image": "efficientnet", "text": "bert", "text2": "bert", "digits": "efficientnet"}
#: held-out test examples per task (digits: what its 1797 images leave after 4x the training data)
TEST_SIZE = {"digits": 1000}
#: ``{task: {scale: epochs multiplier}}`` where the data alone cannot reach the horizon
EPOCHS_X = {"digits": {16: 4}}
#: every method's training recipe per task, shipped defaults otherwise. EfficientNet's BatchNorm
#: (momentum 0.01) still holds mostly ImageNet statistics after the 24-96 steps here, so every
#: image run recomputes them before each evaluation: schedule-free must (its README), and the
#: others then get the same (``train.recompute_bn``)
TRAIN = {"image": {"recompute_bn": True}, "digits": {"recompute_bn": True}}
GRID_LRS = {"efficientnet": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "bert": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]}
GRID_SCHEDULES = ("linear", "cosine")


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


def budget_of(method: str) -> float:
    return SHORT[method][1] if method in SHORT else BUDGET


def search_job(task_name: str, method: str, seed: int) -> dict[str, Any]:
    """The search job of ``method`` (``bench/search_quality.py``'s), on this benchmark's task;
    a variant (``VARIANTS``) is its method's job on ``bench/spaces/{family}_{suffix}.yaml``."""
    sq.TASKS.setdefault("final", {})[task_name] = TASKS[task_name]
    sq.FAMILY[task_name] = FAMILY[task_name]
    base = VARIANTS[method][0] if method in VARIANTS else SHORT[method][0] if method in SHORT else method
    base = "random" if method == "one_epoch_topk" else base
    job = sq.make_job("final", task_name, base, seed, budget_of(method),
                      {"num_test": TEST_SIZE.get(task_name, NUM_TEST)})
    job["name"] = f"fq-{task_name}-{method}-s{seed}"
    if method == "one_epoch_topk":
        job["search"].update(num_trials=ONE_EPOCH_N, max_epochs=1)
    if task_name in TRAIN:
        job["train"] = {**job.get("train", {}), **TRAIN[task_name]}
    if method in VARIANTS:
        job["space"] = {**{k: v for k, v in job["space"].items() if k != "family"},
                        "file": f"bench/spaces/{FAMILY[task_name]}_{VARIANTS[method][1]}.yaml"}
    return job


def epochs_x(task_name: str, scale: int) -> int:
    """How many times a trial's epochs the final run trains at ``scale`` (1: the data alone)."""
    return EPOCHS_X.get(task_name, {}).get(scale, 1)


def final_job(task_name: str, method: str, seed: int, scale: int = SCALE) -> dict[str, Any]:
    """The job of the final run: the search's, on ``scale`` x the training data (or fewer times
    the data for more epochs: :func:`epochs_x`)."""
    base = "family_default" if method in ("schedulefree", "grid", "table3", *RANGE_ONLY) else method
    job = search_job(task_name, base, seed)
    if method in VARIANTS:
        job["space"] = {"family": FAMILY[task_name]}  # the space plays no part in a final run
    if method == "one_epoch_topk":
        job["search"]["max_epochs"] = sq.MAX_EPOCHS  # the final run's epochs: a trial's, not one
    data_x = scale // epochs_x(task_name, scale)
    job["task"] = {**job["task"], "num_train": data_x * TASKS[task_name]["num_train"]}
    job["name"] = f"fq-{task_name}-{method}-s{seed}-final"
    if method == "schedulefree":
        job["optimizer"] = {"name": "adamw_schedulefree", "weight_decay": 0.0}
    return job


def configs(task_name: str, method: str) -> list[dict[str, Any]]:
    """The configs a method without a search trains at the final horizon."""
    family = FAMILY[task_name]
    if method == "hf_default":
        return [{"max_lr": 5e-5, "schedule": "linear", "params": {"warmup_frac": 0.0}}]
    if method == "schedulefree":
        return [{"max_lr": 2.5e-3, "schedule": "constant", "params": {"warmup_frac": 0.05}}]
    if method == "table3":
        return [{"max_lr": lr, "schedule": "linear", "params": {"warmup_frac": 0.1}} for lr in TABLE3[family]]
    if method == "family_default":
        point = sq.family_default_point(family)
        name = point["schedule"]
        return [{"max_lr": point["max_lr"], "schedule": name,
                 "params": {k: v for k, v in point.items() if k not in ("max_lr", "schedule")}}]
    return [{"max_lr": lr, "schedule": s, "params": {"warmup_frac": 0.1}}
            for lr in GRID_LRS[family] for s in GRID_SCHEDULES]


def space_of(task_name: str, method: str) -> dict[str, Any] | None:
    """The content of the space a method's search runs on (a job names its space file, so a
    record must hold what the file said: a changed space file makes new records)."""
    if method not in SEARCHES and method != "one_epoch_topk":
        return None
    space = search_job(task_name, method, 0)["space"]
    path = ROOT / space["file"] if "file" in space else sq.SPACES / f"{space['family']}.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _range_key(method: str) -> dict[str, float]:
    key = {"range_test": RANGE_ONLY[method]}
    if method in RANGE_DIVIDE:
        key["divide"] = RANGE_DIVIDE[method]
    if method in RANGE_STEPS:
        key["steps"] = RANGE_STEPS[method]
    return key


def record_path(task_name: str, method: str, seed: int, scale: int = SCALE) -> Path:
    if method in TOP3 or method in HALVING:
        base_method = TOP3[method] if method in TOP3 else HALVING[method][0]
        base = record_path(task_name, base_method, seed, scale)
        return base.with_name(base.name.replace(f"-{base_method}-", f"-{method}-"))
    searched = method in SEARCHES or method == "one_epoch_topk"
    key: dict[str, Any] = {"search": search_job(task_name, method, seed) if searched else None,
                           "final": final_job(task_name, method, seed, scale),
                           "configs": (None if searched else _range_key(method) if method in RANGE_ONLY
                                       else configs(task_name, method)), "scale": scale,
                           "space": space_of(task_name, method)}
    if epochs_x(task_name, scale) > 1:
        key["epochs_x"] = epochs_x(task_name, scale)
    if method == "one_epoch_topk":
        key["top_k"] = ONE_EPOCH_K
    text = json.dumps(key, sort_keys=True)
    return CACHE / f"{task_name}-{method}-s{seed}-{hashlib.sha1(text.encode()).hexdigest()[:10]}.json"


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def final_run(job: dict[str, Any], search: Any, storage: str, epochs: int | None = None) -> dict[str, Any]:
    """One run at 1x (the bridge methods, LR_SCALES, add their 0.5x and 0.25x runs to it). A config
    that diverges is a result, not a failure: scored 0 on validation and test, so that no pick by
    validation takes it, with ``total_steps`` ``None`` until :func:`_fill_diverged` counts it."""
    try:
        result = lrsearch.train({**job, "storage": {"path": storage}}, search=search, epochs=epochs,
                                lr_scales=(1.0,), track=False)
    except lrsearch.SearchError as exc:
        if "diverged" not in str(exc):
            raise
        return {"test_metric": 0.0, "test_loss": None, "val_metric": 0.0, "diverged": True,
                "config": search if isinstance(search, dict) else None, "total_steps": None}
    return {"test_metric": result.test_metric, "test_loss": result.test_loss, "val_metric": result.val_metric,
            "config": result.config, "total_steps": result.total_steps,
            "steps_per_epoch": result.steps_per_epoch, "seconds": round(result.seconds, 1)}


def _fill_diverged(finals: list[dict[str, Any]]) -> None:
    """A diverged run's compute: the whole horizon, as its siblings trained it (it stopped at the
    end of the epoch it diverged in, so this counts it high)."""
    horizon = max((f["total_steps"] for f in finals if f["total_steps"] is not None), default=None)
    if horizon is None:
        raise RuntimeError("every final run of the record diverged: no horizon to count them at")
    for f in finals:
        if f["total_steps"] is None:
            f["total_steps"] = horizon


def final_epochs(task_name: str, scale: int) -> int | None:
    """The final run's epochs (``None``: the job's, a trial's ``max_epochs``)."""
    x = epochs_x(task_name, scale)
    return sq.MAX_EPOCHS * x if x > 1 else None


def run_one(task_name: str, method: str, seed: int, scale: int = SCALE) -> dict[str, Any]:
    storage = tempfile.mkdtemp(prefix="lrfq-")
    started = time.perf_counter()
    epochs = final_epochs(task_name, scale)
    try:
        record: dict[str, Any] = {"task": task_name, "method": method, "seed": seed, "budget": budget_of(method),
                                  "scale": scale, "lrsearch_version": lrsearch.__version__,
                                  "space": space_of(task_name, method)}
        if method in TOP3:
            return top3(task_name, method, seed, record, storage, started, scale)
        if method in HALVING:
            return halving(task_name, method, seed, record, storage, started, scale)
        if method in RANGE_ONLY:
            return range_only(task_name, method, seed, record, storage, started, scale)
        fjob = final_job(task_name, method, seed, scale)
        per_epoch = sq.steps_per_epoch(TASKS[task_name])
        search_compute = 0.0
        if method in SEARCHES or method == "one_epoch_topk":
            sjob = search_job(task_name, method, seed)
            result = lrsearch.search({**sjob, "storage": {"path": storage}}, track=False, show_progress=False)
            summary = sq.summarize(result, sjob, budget_of(method), method)
            if any(t["state"] == "errored" for t in summary["trials"]):
                raise RuntimeError("a trial errored (infrastructure, not the method)")
            record["search"] = summary
            record["search_value"] = result.best.value if result.best else None
            per_epoch = result.steps_per_epoch
            search_compute = summary["compute_total"]
            if method == "one_epoch_topk":
                record["finals"] = [dict(final_run(fjob, cfg, os.path.join(storage, str(i)), epochs), search_val=val)
                                    for i, (cfg, val) in enumerate(top_configs(summary, ONE_EPOCH_K))]
            else:
                record["finals"] = [final_run(fjob, result, storage, epochs)]
        else:
            record["finals"] = [final_run(fjob, cfg, os.path.join(storage, str(i)), epochs)
                                for i, cfg in enumerate(configs(task_name, method))]
        _fill_diverged(record["finals"])
        spent = sum(f["total_steps"] for f in record["finals"]) / per_epoch
        record["compute"] = {"search": search_compute, "final": spent,
                             "total": search_compute + spent}
        record["seconds"] = round(time.perf_counter() - started, 1)
        return record
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def top_configs(summary: dict[str, Any], k: int) -> list[tuple[dict[str, Any], float]]:
    """The ``k`` completed trials of a search summary with the best last validation score, as
    configs ``lrsearch.train`` takes, each with that score."""
    sign = 1 if summary["mode"] == "max" else -1
    done = sorted((t for t in summary["trials"] if t["state"] == "completed" and t["metric_per_epoch"]),
                  key=lambda t: sign * t["metric_per_epoch"][-1], reverse=True)[:k]
    return [({"max_lr": t["max_lr"], "schedule": t["schedule"], "params": t["params"]}, t["metric_per_epoch"][-1])
            for t in done]


def top3(task_name: str, method: str, seed: int, record: dict[str, Any], storage: str,
         started: float, scale: int = SCALE) -> dict[str, Any]:
    """The top 3 configs of the base method's search at the final horizon, the best kept by validation."""
    base_path = record_path(task_name, TOP3[method], seed, scale)
    epochs = final_epochs(task_name, scale)
    if not base_path.is_file():
        raise RuntimeError(f"needs the {TOP3[method]} record of seed {seed} first")
    base = json.loads(base_path.read_text())
    done = sorted((t for t in base["search"]["trials"] if t["state"] == "completed" and t["metric_per_epoch"]),
                  key=lambda t: t["metric_per_epoch"][-1], reverse=True)[:3]
    fjob = final_job(task_name, TOP3[method], seed, scale)
    finals = [dict(base["finals"][0], search_rank=1, search_val=done[0]["metric_per_epoch"][-1],
                   search_val_loss=done[0]["val_loss_per_epoch"][-1])]
    if method in LR_SCALES:
        best = base["finals"][0]["config"]
        for lr_scale in LR_SCALES[method][1:]:
            final = final_run(fjob, {**best, "max_lr": best["max_lr"] * lr_scale},
                              os.path.join(storage, f"x{lr_scale:g}"), epochs)
            finals.append(dict(final, lr_scale=lr_scale))
        done = []
    for rank, t in enumerate(done[1:], 2):
        final = final_run(fjob, {"max_lr": t["max_lr"], "schedule": t["schedule"], "params": t["params"]},
                          os.path.join(storage, str(rank)), epochs)
        finals.append(dict(final, search_rank=rank, search_val=t["metric_per_epoch"][-1],
                           search_val_loss=t["val_loss_per_epoch"][-1]))
    per_epoch = base["search"]["steps_per_epoch"]
    _fill_diverged(finals)
    spent = sum(f["total_steps"] for f in finals) / per_epoch
    record.update(search=base["search"], search_value=base["search_value"], finals=finals,
                  compute={"search": base["compute"]["search"], "final": spent,
                           "total": base["compute"]["search"] + spent},
                  seconds=round(time.perf_counter() - started, 1))
    return record


def halving(task_name: str, method: str, seed: int, record: dict[str, Any], storage: str,
            started: float, scale: int = SCALE) -> dict[str, Any]:
    """The base method's best config at HALVING's multiples of its max_lr, halved at the final
    horizon in one ``lrsearch.train(..., halving=True)``; compute: its optimizer steps, the
    cooldown branches included."""
    base_method, scales = HALVING[method]
    base_path = record_path(task_name, base_method, seed, scale)
    if not base_path.is_file():
        raise RuntimeError(f"needs the {base_method} record of seed {seed} first")
    base = json.loads(base_path.read_text())
    best = base["finals"][0]["config"]
    config = {"max_lr": best["max_lr"], "schedule": best["schedule"], "params": best.get(best["schedule"]) or {}}
    fjob = final_job(task_name, base_method, seed, scale)
    result = lrsearch.train({**fjob, "storage": {"path": storage}}, search=config, epochs=final_epochs(task_name, scale),
                            lr_scales=scales, halving=True, track=False)
    finals = [{"test_metric": result.test_metric, "test_loss": result.test_loss, "val_metric": result.val_metric,
               "config": result.config, "total_steps": result.total_steps, "steps_per_epoch": result.steps_per_epoch,
               "steps_trained": result.steps_trained, "candidates": result.candidates,
               "seconds": round(result.seconds, 1)}]
    per_epoch = base["search"]["steps_per_epoch"]
    spent = result.steps_trained / per_epoch
    record.update(search=base["search"], search_value=base["search_value"], finals=finals, scales=list(scales),
                  compute={"search": base["compute"]["search"], "final": spent,
                           "total": base["compute"]["search"] + spent},
                  seconds=round(time.perf_counter() - started, 1))
    return record


def range_only(task_name: str, method: str, seed: int, record: dict[str, Any], storage: str,
               started: float, scale: int = SCALE) -> dict[str, Any]:
    """The range test on the final run's data for RANGE_ONLY's share of its optimizer steps, then
    its consensus LR trained once at the horizon with the family's default schedule; compute: the
    test's steps and the run's. ``rt_horizon_mean`` is ``lrsearch train --range-test``
    (``lrsearch.train(job, range_test=True)``); ``rt_horizon`` takes a third of its LR, from
    ``lrsearch.find_lr`` with those steps."""
    fjob = final_job(task_name, method, seed, scale)
    epochs = final_epochs(task_name, scale)
    per_epoch = sq.steps_per_epoch(TASKS[task_name])
    horizon = sq.steps_per_epoch(fjob["task"]) * (epochs or sq.MAX_EPOCHS)
    if RANGE_DIVIDE.get(method) == 1.0:
        # each method's own sweep, whatever --range-test's rule of the day: a quarter of the run
        # (rt_horizon_mean's records) or RANGE_STEPS; lrsearch train --range-test takes the longer
        steps = RANGE_STEPS.get(method) or max(20, round(RANGE_ONLY[method] * horizon))
        fjob = {**fjob, "range_test": {**fjob.get("range_test", {}), "num_steps": steps}}
        result = lrsearch.train({**fjob, "storage": {"path": storage}}, epochs=epochs, range_test=True,
                                lr_scales=(1.0,), track=False)
        rt = result.range_test
        final = {"test_metric": result.test_metric, "test_loss": result.test_loss, "val_metric": result.val_metric,
                 "config": result.config, "total_steps": result.total_steps,
                 "steps_per_epoch": result.steps_per_epoch, "seconds": round(result.seconds, 1)}
        test = {"steps": rt["steps"], "run": rt["steps_run"], "bounds": [rt["low"], rt["high"]],
                "suggestions": rt["suggestions"], "lr": rt["max_lr"]}
    else:
        steps = max(20, round(RANGE_ONLY[method] * horizon))
        rjob = {**fjob, "storage": {"path": storage},
                "range_test": {**fjob.get("range_test", {}), "num_steps": steps}}
        found = lrsearch.find_lr(rjob, save=False)
        lr = found.consensus(divide=3.0)
        point = sq.family_default_point(FAMILY[task_name], lr)
        config = {"max_lr": point["max_lr"], "schedule": point["schedule"],
                  "params": {k: v for k, v in point.items() if k not in ("max_lr", "schedule")}}
        final = final_run(fjob, config, os.path.join(storage, "final"), epochs)
        test = {"steps": steps, "run": len(found.lrs), "bounds": list(found.bounds()),
                "suggestions": found.suggestions(), "lr": lr}
    tested, spent = test["run"] / per_epoch, final["total_steps"] / per_epoch
    record.update(range_test=test, finals=[final], compute={"search": tested, "final": spent, "total": tested + spent},
                  seconds=round(time.perf_counter() - started, 1))
    return record


def run_all(tasks: list[str], methods: list[str], seeds: list[int], grid_seeds: int,
            scales: tuple[int, ...] = (SCALE,)) -> None:
    import ray
    import torch

    torch.set_num_threads(sq.DRIVER_THREADS)
    CACHE.mkdir(parents=True, exist_ok=True)
    todo = [(t, m, s, x) for x in scales for s in seeds for t in tasks for m in methods
            if not (m == "grid" and s >= grid_seeds) and not record_path(t, m, s, x).is_file()]
    print(f"# {len(todo)} runs to do", file=sys.stderr, flush=True)
    ray_tmp = tempfile.mkdtemp(prefix="lrfq-ray-")
    os.environ["RAY_TMPDIR"] = ray_tmp
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        for i, (task_name, method, seed, scale) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {task_name} {method} seed {seed} at {scale}x ...", file=sys.stderr, flush=True)
            try:
                record = run_one(task_name, method, seed, scale)
            except Exception as exc:  # one failure must not stop the rest; retried on the next run
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                print(f"    failed: {type(exc).__name__}: {str(exc).strip()[:300]} "
                      f"(at {frame.filename}:{frame.lineno})", file=sys.stderr, flush=True)
                continue
            path = record_path(task_name, method, seed, scale)
            path.with_suffix(".tmp").write_text(json.dumps(record, separators=(",", ":")) + "\n")
            path.with_suffix(".tmp").replace(path)
            tests = [f["test_metric"] for f in record["finals"]]
            print(f"    test {max(tests):.3f}, compute {record['compute']['total']:.1f} trial-epochs, "
                  f"{record['seconds']:.0f} s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def load(scale: int = SCALE) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """The records at ``scale`` x a trial's steps, by (task, method) and seed."""
    data: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for path in sorted(CACHE.glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("scale", SCALE) != scale or r["method"] not in METHODS or r["task"] not in TASKS:
            continue
        if path == record_path(r["task"], r["method"], r["seed"], scale):  # of this protocol only
            data.setdefault((r["task"], r["method"]), {})[r["seed"]] = r
    return data


def final_runs(r: dict[str, Any]) -> float:
    """A record's whole compute (search, range test, every final run) in final runs at its horizon."""
    return r["compute"]["total"] / (r["scale"] * sq.MAX_EPOCHS)


def test_of(r: dict[str, Any], by: str = "test") -> float:
    """A record's test score; the grid's best final run by test (the oracle) or by validation."""
    finals = r["finals"]
    if by == "val" or r["method"] in TOP3 or r["method"] in PICK_BY_VAL:
        return max(finals, key=lambda f: f["val_metric"])["test_metric"]
    return max(f["test_metric"] for f in finals)


def _min_search_loss(finals: list[dict[str, Any]]) -> dict[str, Any]:
    return min(finals, key=lambda x: x["search_val_loss"])


def _max_final_val(finals: list[dict[str, Any]]) -> dict[str, Any]:
    return max(finals, key=lambda x: x["val_metric"])


def _max_test(finals: list[dict[str, Any]]) -> dict[str, Any]:
    return max(finals, key=lambda x: x["test_metric"])


#: selection rules among a search's top 3 configs, each trained at the final horizon
RULES = {
    "the search's best val accuracy (as shipped, top-1)": lambda finals: finals[0],
    "the search's lowest val loss": _min_search_loss,
    "the final run's val accuracy (top-3, --top-k 3)": _max_final_val,
    "the final run's test accuracy (oracle among the 3)": _max_test,
}


#: the methods every other is compared with, paired by seed: lrsearch as shipped, and its short
#: search bridged to the horizon (``lrsearch train --lr-scales 1,0.5,0.25``)
REFERENCES = ("lrsearch", "lrsearch_short_lrscale")


def _paired(ref: dict[int, dict[str, Any]], runs: dict[int, dict[str, Any]], by: str) -> str:
    """W/T/L of ``ref`` against ``runs`` on their common seeds, and the median (min..max) difference."""
    diffs = [test_of(ref[s]) - test_of(runs[s], by) for s in sorted(set(ref) & set(runs))]
    if not diffs:
        return "-"
    wtl = f"{sum(d > TIE for d in diffs)}/{sum(abs(d) <= TIE for d in diffs)}/{sum(d < -TIE for d in diffs)}"
    return f"{wtl}, {100 * float(np.median(diffs)):+.1f} ({100 * min(diffs):+.1f}..{100 * max(diffs):+.1f})"


def _row(method: str, by: str, runs: dict[int, dict[str, Any]]) -> tuple[str, list[float], float]:
    """A table row's name, test scores (the grid's by test or by validation) and median compute."""
    name = {"grid": "grid (oracle: best by test)"}.get(method, method) if by == "test" else "grid, best by val"
    compute = float(np.median([r["compute"]["total"] for r in runs.values()]))
    return name, [test_of(r, by) for r in runs.values()], compute


#: the headline: lrsearch as a user runs it at the peers' compute (its short search, then the
#: bridge), each alternative a user has at about that compute, then the oracle
HEADLINE = ("lrsearch_short_lrscale", "peer_matched", "random_matched", "peer", "random", "hf_default",
            "schedulefree", "family_default", "grid")


def headline(data: dict[tuple[str, str], dict[int, dict[str, Any]]]) -> list[str]:
    """One table over the tasks: lrsearch at equal compute against each alternative, paired by seed."""
    ref = HEADLINE[0]
    out = ["## At equal compute: lrsearch against what a user would do instead\n",
           f"| task | method | seeds | median test [IQR] | compute | {ref} - method: W/T/L, median (min..max) pts |",
           "|---|---|---|---|---|---|"]
    for task in TASKS:
        for method, by in [(m, "test") for m in HEADLINE] + [("grid", "val")]:
            runs = data.get((task, method))
            if not runs:
                continue
            name, tests, compute = _row(method, by, runs)
            q50, q25, q75 = (float(x) for x in np.percentile(tests, [50, 25, 75]))
            paired = "-" if method == ref else _paired(data.get((task, ref), {}), runs, by)
            out.append(f"| {task} | {name} | {len(runs)} | {q50:.3f} [{q25:.3f}-{q75:.3f}] | {compute:.0f} | {paired} |")
    return out + [""]


#: the compute-at-parity table: lrsearch as a user runs it, then each alternative
PARITY = ("lrsearch_short_lrscale", "lrsearch_short_halving", "lrsearch_short_halving_down", "lrsearch_short",
          "lrsearch", "rt_horizon", "rt_horizon_mean", "rt_steps100", "table3", "one_epoch_topk", "peer_matched",
          "random_matched",
          "peer", "random", "hf_default", "schedulefree", "family_default", "grid")


def shipped(scale: int) -> str:
    """lrsearch as a user runs it at ``scale`` x a trial's steps: its short search, then
    ``lrsearch train``'s default (``--lr-scales auto``: the three scales each trained in full below
    8x the searched steps, halved on the way from 8x)."""
    return "lrsearch_short_halving_down" if scale >= 8 else "lrsearch_short_lrscale"


def parity() -> list[str]:
    """Per horizon and task: each method's median held-out test and its compute in final runs,
    paired by seed with lrsearch as a user runs it (:func:`shipped`)."""
    out = ["## At each horizon: held-out test against compute in final runs\n",
           "Compute counts the search, the range test and every final run, in final runs at that "
           "horizon (one final run: the config trained once at the horizon). table3 and "
           "one_epoch_topk keep their best final run by validation. The paired column compares "
           "lrsearch as shipped at that horizon (the first row) with each method.\n",
           "| horizon | task | method | seeds | median test [IQR] | final runs | LR handed over (median) "
           "| shipped - method: W/T/L, median (min..max) pts |", "|---|---|---|---|---|---|---|---|"]
    for scale in SCALES:
        data = load(scale)
        ref = shipped(scale)
        for task in TASKS:
            for method in dict.fromkeys((ref, *PARITY)):
                runs = data.get((task, method))
                if not runs:
                    continue
                by = "test" if method != "grid" else "val"
                name, tests, _ = _row(method, by, runs)
                q50, q25, q75 = (float(x) for x in np.percentile(tests, [50, 25, 75]))
                cost = float(np.median([final_runs(r) for r in runs.values()]))
                lr = float(np.median([max(r["finals"], key=lambda f: f["val_metric"])["config"]["max_lr"]
                                      for r in runs.values()]))
                paired = "-" if method == ref else _paired(data.get((task, ref), {}), runs, by)
                out.append(f"| {scale}x | {task} | {name} | {len(runs)} | {q50:.3f} [{q25:.3f}-{q75:.3f}] | "
                           f"{cost:.2f} | {lr:.2g} | {paired} |")
    return out + [""]


#: what a user would do instead, given about 3 final runs: the best of these by median is the bar
THREE_RUNS = ("table3", "one_epoch_topk", "peer", "random")


def multipliers() -> list[str]:
    """One final run of the short search's config at a fixed fraction of its max_lr (1, 1/2, 1/4),
    read from the bridge's records (its runs at those scales): which fixed rule, if any, carries the
    searched LR to each horizon, against the best alternative at about 3 final runs."""
    out = ["## One final run at a fixed fraction of the searched LR\n",
           "Each cell: the median held-out test (min..max) of `lrsearch_short`'s config trained once at "
           "that fraction of its max_lr, taken from `lrsearch_short_lrscale`'s runs, and the difference "
           "from the best alternative given about 3 final runs (the best median of "
           f"{', '.join(THREE_RUNS)}). Compute: `lrsearch_short`'s (search, range test, one final run). "
           "A power law lr ~ steps^-a from the trials' horizon gives 1/2 at 4x and 1/4 at 16x for a = 0.5.\n",
           "| horizon | task | seeds | final runs | x1 | x0.5 | x0.25 | best at ~3 runs |",
           "|---|---|---|---|---|---|---|---|"]
    for scale in SCALES:
        data = load(scale)
        for task in TASKS:
            runs = data.get((task, "lrsearch_short_lrscale"))
            if not runs:
                continue
            bars = {m: float(np.median([test_of(r) for r in data[(task, m)].values()]))
                    for m in THREE_RUNS if (task, m) in data}
            bar_name = max(bars, key=bars.get) if bars else None
            cells = []
            for mult in (1.0, 0.5, 0.25):
                tests = [f["test_metric"] for r in runs.values() for f in r["finals"]
                         if f.get("lr_scale", 1.0) == mult]
                gap = f", {100 * (float(np.median(tests)) - bars[bar_name]):+.1f}" if bar_name else ""
                cells.append(f"{float(np.median(tests)):.3f} ({min(tests):.3f}..{max(tests):.3f}){gap}")
            single = data.get((task, "lrsearch_short"), {})
            cost = float(np.median([final_runs(r) for r in single.values()])) if single else float("nan")
            bar = f"{bar_name} {bars[bar_name]:.3f}" if bar_name else "-"
            out.append(f"| {scale}x | {task} | {len(runs)} | {cost:.2f} | {' | '.join(cells)} | {bar} |")
    return out + [""]


#: ``lrsearch train --range-test`` as shipped sweeps the longer of a quarter of the run and 100
#: steps: of these records, the one with the most steps per task and horizon
RANGE_SHIPPED = ("rt_steps100", "rt_horizon_mean")
#: what a search buys beyond ``--range-test``: (column, method; ``None``: lrsearch train's default)
WITH_SEARCH = (("search B=6, one run", "lrsearch_short"), ("search B=18, one run", "lrsearch"),
               ("search B=6, then `lrsearch train`'s default", None))


def _range_test_as_shipped(data: dict[tuple[str, str], dict[int, dict[str, Any]]],
                           task: str) -> dict[int, dict[str, Any]] | None:
    options = [data[(task, m)] for m in RANGE_SHIPPED if (task, m) in data]
    return max(options, key=lambda runs: float(np.median([r["range_test"]["steps"] for r in runs.values()])),
               default=None)


def search_adds() -> list[str]:
    """What the TPE + ASHA search adds at each budget: ``--range-test`` (no search, one final run)
    against the search and one final run, and the search and ``lrsearch train``'s default."""
    out = ["## What the search adds, at each budget\n",
           "Each cell: the median held-out test, the median compute in final runs, then the difference "
           "from `--range-test` (no search) in points with the paired W/T/L on common seeds.\n",
           "| horizon | task | no search: `--range-test` | "
           + " | ".join(name for name, _ in WITH_SEARCH) + " |", "|---|---|---|" + "---|" * len(WITH_SEARCH)]
    for scale in SCALES:
        data = load(scale)
        for task in TASKS:
            base = _range_test_as_shipped(data, task)
            if base is None:
                continue
            base_test = float(np.median([test_of(r) for r in base.values()]))
            cells = [f"{base_test:.3f} ({float(np.median([final_runs(r) for r in base.values()])):.2f})"]
            for _, method in WITH_SEARCH:
                runs = data.get((task, method or shipped(scale)))
                if not runs:
                    cells.append("-")
                    continue
                test = float(np.median([test_of(r) for r in runs.values()]))
                cost = float(np.median([final_runs(r) for r in runs.values()]))
                wtl = _paired(runs, base, "test").split(",")[0]
                cells.append(f"{test:.3f} ({cost:.2f}): {100 * (test - base_test):+.1f}, {wtl}")
            out.append(f"| {scale}x | {task} | {' | '.join(cells)} |")
    return out + [""]


def _vertex(points: list[tuple[float, float]]) -> float:
    """The log2 LR multiple at which a parabola through ``(log2 multiple, score)`` peaks, kept within
    one doubling of the points; the best point when the parabola is not concave."""
    us, ys = zip(*points, strict=True)
    a, b, _ = np.polyfit(us, ys, 2)
    if a >= 0:
        return us[int(np.argmax(ys))]
    return float(np.clip(-b / (2 * a), min(us) - 1, max(us) + 1))


def two_point() -> list[str]:
    """A horizon model from what halving already measures: the best LR at a trial's horizon (the
    search's pick) and at halving's rung (the peak of a parabola through its three cooldown
    scores), a power law lr* ~ steps^-beta through the two, extrapolated to the horizon. Read from
    the ``_halving_down`` records at 16x (at 4x the rung sits at a trial's horizon: no span)."""
    out = ["## A two-point horizon model, read from halving's records\n",
           "Per seed: the search's LR at a trial's steps T, the peak of a parabola through halving's "
           "three cooldown scores (1x, 0.5x, 0.25x) at its rung, the power law through the two, and "
           "its LR at the horizon H. The grid's best (by validation, median over its seeds) is the "
           "target.\n",
           "| task | seed | searched LR (T) | rung peak (H/4) | beta | predicted at H | halving kept | grid's best at H |",
           "|---|---|---|---|---|---|---|---|"]
    data = load(16)
    for task in TASKS:
        grid = data.get((task, "grid"), {})
        picked = [max(r["finals"], key=lambda f: f["val_metric"])["config"]["max_lr"] for r in grid.values()]
        best = f"{float(np.median(picked)):.2g}" if grid else "-"
        if grid and float(np.median(picked)) == min(GRID_LRS[FAMILY[task]]):
            best += " (its lowest LR)"
        for seed, r in sorted(data.get((task, "lrsearch_short_halving_down"), {}).items()):
            final = r["finals"][0]
            scales = [float(c["trial_id"].split("@")[1][:-1]) if "@" in c["trial_id"] else 1.0
                      for c in final["candidates"]]
            kept = max(zip((c["epochs"] for c in final["candidates"]), scales, strict=True))[1]  # the one that went on
            searched = final["config"]["max_lr"] / kept
            rung = int(next(iter(final["candidates"][0]["rung_scores"])))
            u = _vertex([(np.log2(x), next(iter(c["rung_scores"].values())))
                         for x, c in zip(scales, final["candidates"], strict=True)])
            horizon, trial = final["total_steps"], final["total_steps"] / 16
            beta = -u / np.log2(rung * final["steps_per_epoch"] / trial)
            predicted = u - beta * np.log2(horizon / (rung * final["steps_per_epoch"]))
            out.append(f"| {task} | {seed} | {searched:.2g} | {2 ** u:.2f}x | {beta:.2f} | "
                       f"{2 ** predicted:.3f}x = {searched * 2 ** predicted:.2g} | {kept:g}x = {searched * kept:.2g} "
                       f"(test {final['test_metric']:.3f}) | {best} |")
    return out + [""]


def report() -> str:
    from scipy.stats import spearmanr

    data = load()
    out = ["# Final-run quality: what users take home\n",
           f"Each method's chosen config trained on {SCALE}x the search's data at {SCALE}x a trial's "
           f"optimizer steps, scored once on {NUM_TEST} held-out test examples. Search budget "
           f"{BUDGET:g} trial-epochs; compute = search + final run, in trial-epochs. Median [IQR] over "
           f"seeds. The paired columns compare a reference with each method on their common seeds: W/T/L "
           f"(tie: within {TIE}), then the reference's test minus the method's, in accuracy points.\n",
           *parity(), *search_adds(), *multipliers(), *two_point(), *headline(data)]
    for task in TASKS:
        rows = {m: data[(task, m)] for m in METHODS if (task, m) in data}
        if not rows:
            continue
        out.append(f"## `{task}`: {TASKS[task]['model']}, {TASKS[task]['dataset']}\n")
        out.append("| method | seeds | median test | IQR | worst | compute | "
                   + " | ".join(f"{ref} - method: W/T/L, median (min..max) pts" for ref in REFERENCES)
                   + " | search score -> test (Spearman) |")
        out.append("|---|---|---|---|---|---|" + "---|" * len(REFERENCES) + "---|")
        ours = rows.get("lrsearch", {})
        variants = [(m, "test") for m in rows] + ([("grid", "val")] if "grid" in rows else [])
        variants.sort(key=lambda v: (v[0] == "grid", v[0] in TOP3, METHODS.index(v[0])))
        for method, by in variants:
            runs = rows[method]
            name, tests, compute = _row(method, by, runs)
            q50, q25, q75 = (float(x) for x in np.percentile(tests, [50, 25, 75]))
            cells = [_paired(rows.get(ref, {}), runs, by) if (method, by) != (ref, "test") else "-"
                     for ref in REFERENCES]
            rho = "-"
            pairs = [(r["search_value"], test_of(r)) for r in runs.values() if r.get("search_value") is not None]
            if len(pairs) >= 3 and len({a for a, _ in pairs}) > 1:
                rho = f"{spearmanr(*zip(*pairs, strict=True)).statistic:.2f}"
            out.append(f"| {name} | {len(runs)} | {q50:.3f} | {q25:.3f}-{q75:.3f} | {min(tests):.3f} | {compute:.0f} | "
                       f"{' | '.join(cells)} | {rho} |")
        searched = [r for m in SEARCHES for r in rows.get(m, {}).values() if r.get("search_value") is not None]
        if len(searched) >= 3:
            rho = spearmanr([r["search_value"] for r in searched], [test_of(r) for r in searched]).statistic
            out.append(f"\nAll {len(searched)} searches: Spearman(search's best val, final test) = {rho:.2f}.")
        for method in TOP3:
            runs = rows.get(method, {})
            if not runs:
                continue
            what = (f"the best config at {', '.join(f'{x:g}x' for x in LR_SCALES[method])} its max_lr"
                    if method in LR_SCALES else "top 3")
            out.append(f"\nChoosing among {method}'s {what}, each trained at the final horizon "
                       f"({len(runs)} seeds): median test by rule")
            out.append("\n| rule | median test | IQR |\n|---|---|---|")
            for rule, pick in RULES.items():
                if method in LR_SCALES and "val loss" in rule:  # one search trial: no loss to rank by
                    continue
                tests = [pick(r["finals"])["test_metric"] for r in runs.values()]
                q50, q25, q75 = (float(x) for x in np.percentile(tests, [50, 25, 75]))
                out.append(f"| {rule} | {q50:.3f} | {q25:.3f}-{q75:.3f} |")
        if ours:
            lrs = [f"{r['finals'][0]['config']['max_lr']:.2g} {r['finals'][0]['config']['schedule']}"
                   for _, r in sorted(ours.items())]
            out.append(f"\nlrsearch handed over: {', '.join(lrs)}.")
        if "grid" in rows:
            for seed, r in sorted(rows["grid"].items()):
                cells = ", ".join(f"{f['config']['max_lr']:g} {f['config']['schedule']}: {f['test_metric']:.3f}"
                                  for f in r["finals"])
                out.append(f"\nGrid, seed {seed}: {cells}.")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--grid-seeds", type=int, default=2)
    p.add_argument("--scales", default=str(SCALE), help=f"horizons, comma list of {SCALES}")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    for name, got, allowed in (("--tasks", tasks, TASKS), ("--methods", methods, METHODS)):
        bad = [x for x in got if x not in allowed]
        if bad:
            p.error(f"{name}: {bad[0]!r}; allowed: {', '.join(allowed)}")
    if not args.report_only:
        scales = tuple(int(x) for x in args.scales.split(","))
        if any(x not in SCALES for x in scales):
            p.error(f"--scales: {args.scales!r}; allowed: a comma list of {', '.join(map(str, SCALES))}")
        run_all(tasks, methods, list(range(args.first_seed, args.first_seed + args.seeds)), args.grid_seeds,
                scales)
    text = report()
    REPORT.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
