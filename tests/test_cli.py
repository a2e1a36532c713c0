"""The CLI through Typer's CliRunner: exit codes, JSON output, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lrsearch.cli import app
from lrsearch.optim.schedules import SCHEDULES

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("schedules", "find-lr", "search", "train", "demo"):
        assert command in result.output


def test_schedules_lists_every_schedule_with_defaults(tmp_path):
    plot = tmp_path / "curves.png"
    result = runner.invoke(app, ["schedules", "--plot", str(plot), "--total-steps", "200",
                                 "--max-lr", "0.01"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in SCHEDULES:
        assert name in result.output
    assert "cut_frac = 0.1" in result.output and "T_0 = total_steps // 4" in result.output
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_schedules_json():
    result = runner.invoke(app, ["schedules", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    one_cycle = next(s for s in data["schedules"] if s["name"] == "one_cycle")
    assert {p["name"]: p["default"] for p in one_cycle["params"]} == {
        "pct_start": "0.3", "div_factor": "25", "final_div_factor": "1e4"}


def test_bad_option_is_one_line_exit_2():
    result = runner.invoke(app, ["schedules", "--plot", "x.png", "--total-steps", "0"])
    assert result.exit_code == 2
    assert "total_steps=0" in result.output
    assert "Traceback" not in result.output


def test_search_json_on_the_synthetic_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = Path(__file__).resolve().parent.parent / "examples" / "synthetic.yaml"
    result = runner.invoke(app, ["search", str(job), "--num-trials", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["counts"]["total"] == 3
    assert data["best_config"]["schedule"] in SCHEDULES
    assert Path(data["paths"]["trials"]).is_file() and Path(data["paths"]["best_config"]).is_file()
    # a second run of the same job refuses to overwrite, in one line
    again = runner.invoke(app, ["search", str(job), "--num-trials", "3"])
    assert again.exit_code == 2 and "--resume" in again.output and "Traceback" not in again.output


def test_demo_job_is_minilm_on_fortunes_and_valid():
    from lrsearch.demo import demo_job

    job = demo_job(quick=True)
    assert (job.task.kind, job.task.model, job.task.dataset) == ("text_classification", "minilm-l6", "fortunes")
    assert job.search.num_trials >= 4 and job.range_test.enabled


def test_user_errors_are_one_line_but_library_bugs_keep_their_traceback():
    from lrsearch.cli import _clear_errors
    from lrsearch.errors import ConfigError

    @_clear_errors
    def user_error():
        raise ConfigError("search.num_trials: got 0; allowed: a value >= 1")

    @_clear_errors
    def bug():
        raise ValueError("a bug inside lrsearch")

    with pytest.raises(SystemExit) as exit_info:
        user_error()
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="a bug inside lrsearch"):  # not turned into 'error: ...'
        bug()


def test_submit_refuses_the_final_runs_options_without_train():
    # --halving (a flag) and the valued final-run options: refused without --train, before any connection
    job = Path(__file__).resolve().parents[1] / "examples" / "synthetic.yaml"
    for options in (["--halving"], ["--no-halving"], ["--top-k", "2", "--halving"]):
        result = runner.invoke(app, ["submit", str(job), "--address", "http://127.0.0.1:9", *options])
        assert result.exit_code == 2
        assert f"{', '.join(o for o in options if o.startswith('--'))}: only with --train" in result.output
