"""The CLI through Typer's CliRunner: exit codes, JSON output, one-line errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lrsearch.cli import app
from lrsearch.schedules import SCHEDULES

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("schedules", "demo"):
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


def test_demo_quick_json(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--json", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    low, high = data["bounds"]
    assert 0 < low < high
    assert (tmp_path / "range_test.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "range_test.json").read_text())
    assert saved["bounds"] == [low, high]


def test_demo_prints_table(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--out-dir", str(tmp_path)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "max_lr search bounds" in result.output and "suggestion: valley" in result.output
