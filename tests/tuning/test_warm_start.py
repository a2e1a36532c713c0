"""search.warm_start: a search seeded with an earlier one's trials, read back from MLflow (real Ray,
real Optuna, real MLflow; the synthetic task keeps it fast)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import mlflow_uri
from typer.testing import CliRunner

from lrsearch.cli import app
from lrsearch.errors import ConfigError
from lrsearch.job.parse import parse_job
from lrsearch.job.space import SpaceSampler
from lrsearch.output.report import search_tables
from lrsearch.tuning import run_search
from lrsearch.tuning.optuna_adapter import PrunedAwareOptunaSearch, make_sampler
from lrsearch.tuning.warm_start import read_past_searches, seed_trials

FIRST = "first-exp"  # the first search's MLflow experiment


def _data(root: Path, name: str, **search) -> dict:
    return {
        "name": name,
        "task": {"kind": "synthetic", "num_train": 512, "num_val": 256, "batch_size": 64},
        "range_test": {"enabled": False},
        "space": {"max_lr": {"low": 1e-3, "high": 0.1, "log": True}},
        "search": {"num_trials": 7, "max_epochs": 3, "grace_period": 1, "reduction_factor": 3,
                   "max_concurrent_trials": 2, "seed": 0, **search},
        "storage": {"path": str(root / "runs")},
        "tracking": {"uri": mlflow_uri(root), "experiment": f"{name}-exp"},
    }


def _job(root: Path, name: str, *, space: dict | None = None, **search):
    data = _data(root, name, **search)
    data["space"].update(space or {})
    return parse_job(data)


@pytest.fixture(scope="module")
def searches(local_ray, tmp_path_factory):
    """A first search (one trial diverges: its start point), then a second warm-started from it."""
    root = tmp_path_factory.mktemp("warm")
    # one trial at a time: ASHA's stops then follow from the results alone, not from which trial a
    # loaded machine happens to finish first (two at once pruned none when the suite shared the CPUs)
    first = run_search(_job(root, "first", max_concurrent_trials=1,
                            start_points=[{"max_lr": 300.0, "schedule": "constant"}]), show_progress=False)
    c = first.counts
    # the data the tests need: completed, pruned and diverged trials to seed
    assert c["completed"] >= 1 and c["pruned"] >= 1 and c["diverged"] == 1 and c["errored"] == 0, c
    second_job = _job(root, "second", num_trials=3, seed=1, warm_start=[FIRST])
    second = run_search(second_job, show_progress=False)
    return root, first, second, second_job


def _study(result) -> list[dict]:
    return json.loads(Path(result.paths["optuna_trials"]).read_text())


def _key(params: dict) -> str:
    return json.dumps(sorted(params.items()))


def test_the_new_study_holds_the_first_searchs_finished_trials(searches):
    _, first, second, _ = searches
    seeded = [t for t in _study(second) if "warm_start" in t["user_attrs"]]
    own = [t for t in _study(second) if "warm_start" not in t["user_attrs"]]
    assert len(own) == 3  # and the second search's own trials
    finished = [t for t in _study(first) if t["state"] in ("COMPLETE", "PRUNED")]
    inside = [t for t in finished if 1e-3 <= t["params"]["max_lr"] <= 0.1]  # all but the diverged one
    assert len(inside) == len(finished) - 1 == len(seeded)
    by_params = {_key(t["params"]): t for t in seeded}
    assert len(by_params) == len(seeded)
    for t in inside:
        s = by_params[_key(t["params"])]  # the same parameters, exactly
        assert s["state"] == t["state"] and s["value"] == pytest.approx(t["value"])
        # per-epoch values, PRUNED ones too; a search tells its completed trials' last epoch as
        # their value only, the seed has it as an intermediate value as well
        last = {"3": t["value"]} if t["state"] == "COMPLETE" else {}
        assert s["intermediate"] == pytest.approx({**t["intermediate"], **last})
        assert s["user_attrs"]["warm_start"] == FIRST
    assert {s["state"] for s in seeded} == {"COMPLETE", "PRUNED"}
    assert any(len(s["intermediate"]) < 3 for s in seeded if s["state"] == "PRUNED")


def test_the_summary_and_mlflow_say_what_was_reused(searches):
    _, first, second, _ = searches
    assert first.warm_start is None and first.summary()["warm_start"] is None  # off by default
    report = second.warm_start
    n = sum(t.state.value in ("completed", "pruned") for t in first.trials)
    assert report["reused"] == n and report["dropped"] == 1
    (source,) = report["sources"]
    assert source["ref"] == FIRST and source["run_id"] == first.tracking["run_id"]
    assert source["trials"] == n + 1 and source["completed"] == first.counts["completed"]
    assert source["pruned"] == first.counts["pruned"] and source["diverged"] == 0
    assert source["dropped"] == {"max_lr outside this space": 1}  # the diverged start point, at 300
    assert json.loads(Path(second.paths["summary"]).read_text())["warm_start"] == report
    text = "\n".join(p for p in search_tables(second) if isinstance(p, str))
    assert f"warm start: seeded {n} trials: {n} of {n + 1} from '{FIRST}'" in text
    assert "dropped 1: 1 max_lr outside this space" in text
    from mlflow import MlflowClient

    client = MlflowClient(second.tracking["uri"])
    parent = client.get_run(second.tracking["run_id"])
    assert parent.data.params["warm_start.reused"] == str(n)
    assert parent.data.params["warm_start.sources"] == f"{FIRST}:{first.tracking['run_id']}"
    assert parent.data.tags["lrsearch.warm_start"].startswith(f"warm start: seeded {n} trials")
    assert "warm_start.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def _past(root: Path, refs=(FIRST,)):
    return read_past_searches(list(refs), f"sqlite:///{root}/mlruns.db")


def test_trials_outside_the_new_space_are_dropped_with_their_reason(searches):
    root, first, _, _ = searches
    kept_schedule = first.best.schedule
    space = _job(root, "narrow", space={"schedules": [kept_schedule], "max_lr": {"low": 0.01, "high": 0.1}}
                 ).search_space()
    seeds, report = seed_trials(_past(root), space, metric="val_accuracy", max_epochs=3, worst=0.0)
    expected = Counter()
    for t in first.trials:
        if t.schedule != kept_schedule:
            expected[f"schedule {t.schedule!r} not in this space"] += 1
        elif not 0.01 <= t.max_lr <= 0.1:
            expected["max_lr outside this space"] += 1
    assert report["sources"][0]["dropped"] == dict(expected)
    assert len(seeds) == len(first.trials) - sum(expected.values()) == report["reused"]
    for s in seeds:  # each seed lies in the new space, under its distributions
        assert s.params["schedule"] == kept_schedule and 0.01 <= s.params["max_lr"] <= 0.1
        assert s.distributions["max_lr"] == optuna.distributions.FloatDistribution(0.01, 0.1, log=True)

    # a parameter the earlier search never sampled; another horizon; another objective
    wd = _job(root, "wd", space={"weight_decay": {"low": 1e-4, "high": 0.1, "log": True}}).search_space()
    _, report = seed_trials(_past(root), wd, metric="val_accuracy", max_epochs=3, worst=0.0)
    assert report["reused"] == 0
    assert report["sources"][0]["dropped"] == {"no weight_decay (this space searches it)": len(first.trials) - 1,
                                               "max_lr outside this space": 1}
    _, report = seed_trials(_past(root), space, metric="val_accuracy", max_epochs=4, worst=0.0)
    assert report["sources"][0]["dropped"] == {"its max_epochs is 3, not 4": len(first.trials)}
    _, report = seed_trials(_past(root), space, metric="val_loss", max_epochs=3, worst=0.0)
    assert report["sources"][0]["dropped"] == {"its metric is val_accuracy, not val_loss": len(first.trials)}
    # the same search named twice seeds once
    _, report = seed_trials(_past(root, [FIRST, first.tracking["run_id"]]), space, metric="val_accuracy",
                            max_epochs=3, worst=0.0)
    assert report["sources"][1]["dropped"] == {"the same search as an earlier warm_start entry": len(first.trials)}


def test_a_diverged_trial_seeds_as_pruned_at_the_worst_value(searches):
    root, first, _, _ = searches
    wide = _job(root, "wide", space={"max_lr": {"low": 1e-3, "high": 1e3, "log": True}}).search_space()
    seeds, report = seed_trials(_past(root), wide, metric="val_accuracy", max_epochs=3, worst=-7.0)
    assert report["reused"] == len(first.trials) and report["sources"][0]["diverged"] == 1
    (diverged,) = [s for s in seeds if s.user_attrs["diverged"]]
    assert diverged.params["max_lr"] == 300.0 and diverged.state == optuna.trial.TrialState.PRUNED
    assert diverged.intermediate_values == {1: -7.0} and diverged.value == -7.0


def _first_suggestion(space, warm, storage=None):
    searcher = PrunedAwareOptunaSearch(space=SpaceSampler(space), metric="val_accuracy", mode="max",
                                       sampler=make_sampler("tpe", seed=1, num_trials=12), max_t=3,
                                       storage=storage, study_name="s", warm_trials=warm)
    return searcher, searcher.suggest("trial-1")


def test_tpe_counts_the_seeded_trials_as_its_startup_trials(searches):
    root, _, _, second_job = searches
    space = second_job.search_space()
    seeds, _ = seed_trials(_past(root), space, metric="val_accuracy", max_epochs=3, worst=0.0)
    startup = 5  # make_sampler's TPE: min(5, num_trials // 2) random trials first
    assert len(seeds) >= startup
    _, cold = _first_suggestion(space, [])
    assert _first_suggestion(space, [])[1] == cold  # a startup trial: the seed alone decides it
    # one seeded trial short of TPE's startup count, it still draws at random; with enough, its own
    assert _first_suggestion(space, seeds[:startup - 1])[1] == cold
    assert _first_suggestion(space, seeds[:startup])[1] != cold
    assert _first_suggestion(space, seeds)[1] != cold


def test_resume_does_not_seed_twice(searches, tmp_path):
    root, _, second, second_job = searches
    space = second_job.search_space()
    seeds, _ = seed_trials(_past(root), space, metric="val_accuracy", max_epochs=3, worst=0.0)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    for _ in range(2):  # a searcher built again on the study's storage
        searcher, _ = _first_suggestion(space, seeds, storage)
    assert len(searcher.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                                 optuna.trial.TrialState.PRUNED))) == len(seeds)
    # the search resumed: its study and report as they were; earlier searches not read again
    before = _study(second)
    job = second_job.model_copy(update={"search": second_job.search.model_copy(
        update={"warm_start": ["deleted-since"]})})
    resumed = run_search(job, resume=True, show_progress=False)
    assert _study(resumed) == before
    assert sum("warm_start" in t["user_attrs"] for t in before) == second.warm_start["reused"]
    assert resumed.warm_start == second.warm_start


def _write(tmp_path: Path, root: Path, warm_start) -> Path:
    data = _data(tmp_path, "bad", warm_start=warm_start)
    data["tracking"]["uri"] = f"sqlite:///{root}/mlruns.db"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_warm_start_is_one_line_exit_2_before_anything_starts(searches, tmp_path):
    root, first, _, _ = searches
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns.db")
    other = client.create_run(client.get_experiment_by_name(FIRST).experiment_id, run_name="by hand")
    cases = {"no-such-search": "no experiment or run 'no-such-search' at sqlite:///",
             other.info.run_id: "is not an lrsearch search"}
    for ref, why in cases.items():
        result = CliRunner().invoke(app, ["search", str(_write(tmp_path, root, [ref])), "--json"])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"search.warm_start: got {ref!r}" in line and why in line and "allowed: the name of an experiment" in line
        # before anything started: no trial ran, no MLflow run of this search was created
        assert not (tmp_path / "runs" / "bad" / "tune").exists()
        assert client.get_experiment_by_name("bad-exp") is None
    # a trial's run id names its search
    trial_run = client.search_runs([other.info.experiment_id], "tags.`lrsearch.role` = 'trial'")[0]
    (past,) = _past(root, [trial_run.info.run_id])
    assert past.run_id == first.tracking["run_id"] and len(past.trials) == len(first.trials)
    with pytest.raises(ConfigError, match=r"search\.warm_start: got \[''\]"):
        parse_job(_data(tmp_path, "bad", warm_start=[""]))
