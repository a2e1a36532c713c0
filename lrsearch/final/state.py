"""A final run's files under ``STORAGE/NAME/final/``: ``state.json`` (what ``--resume`` continues:
the MLflow run, each candidate's report once trained), epoch checkpoints, the chosen model."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lrsearch.errors import SearchError
from lrsearch.infra.tracking.store import _client

__all__ = ["FINAL_DIR", "CandidateReport", "clear", "end_run", "final_dir", "load_state", "save_state"]

FINAL_DIR = "final"


@dataclass(frozen=True)
class CandidateReport:
    """One candidate of a final run: its last validation metric and loss, whether it diverged, the
    epochs it trained (the horizon's, or fewer: ``--halving`` stopped it), and its scores at the
    halving rungs it reached (epoch -> the validation metric after a short cooldown branch)."""

    val_metric: float
    val_loss: float
    diverged: bool
    epochs: int
    rung_scores: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, data: dict[str, Any]) -> CandidateReport:
        return cls(**{k: data[k] for k in ("val_metric", "val_loss", "diverged", "epochs")},
                   rung_scores=dict(data.get("rung_scores", {})))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def final_dir(results_dir: str) -> Path:
    """Where a final run of the job whose results go to ``results_dir`` keeps its files (an
    ``s3://`` results directory: ``lrsearch-runs/NAME`` here, the checkpoints being local)."""
    base = Path(results_dir) if "://" not in results_dir else Path("lrsearch-runs") / Path(results_dir).name
    return base / FINAL_DIR


def load_state(out: Path, resume: bool, fresh: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """What a resumed run continues (its MLflow run, the candidates done), or ``fresh``: what this
    run trains (the search's run id, the candidates, the horizon), which a resumed run must match."""
    file = out / "state.json"
    if resume and file.is_file():
        saved = json.loads(file.read_text())
        for key, value in fresh.items():
            if saved.get(key) != value:
                raise SearchError(f"--resume: the final run in {out} trained {key}={saved.get(key)!r}, "
                                  f"not {value!r}; resume it as it was, or start afresh without --resume")
        saved.setdefault("done", {})  # marks a resumed run: its directory is kept
        return saved
    if resume:
        notes.append(f"--resume: no final run had been saved in {out}; starting from the beginning")
    return dict(fresh)


def clear(out: Path) -> None:
    """An empty final-run directory; an earlier run killed there is closed in MLflow."""
    if out.exists():
        _close_killed_run(out)
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _close_killed_run(out: Path) -> None:
    # an earlier final run killed mid-way, replaced by this one: no MLflow run is left RUNNING
    file = out / "state.json"
    if not file.is_file():
        return
    saved = json.loads(file.read_text())
    if saved.get("run_id") and saved.get("uri"):
        try:
            client = _client(saved["uri"])
            if client.get_run(saved["run_id"]).info.status == "RUNNING":
                client.set_terminated(saved["run_id"], "KILLED")
        except Exception:
            return


def end_run(run: Any, out: Path, status: str) -> None:
    """End the final run's MLflow run; a store that is down gets the end from the next lrsearch
    command on the job (``lrsearch.infra.tracking.heal`` reads it from ``state.json``)."""
    if run.finish(status):
        return
    file = out / "state.json"
    state = json.loads(file.read_text()) if file.is_file() else {"run_id": run.run_id}
    state.update(ended=status, ended_logged=False)  # re-read: the worker wrote what it trained
    save_state(out, state)


def save_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out / "state.json")
