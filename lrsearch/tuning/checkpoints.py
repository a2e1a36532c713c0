"""Trial checkpoints on the search's storage: keep each trial's newest while it runs, repair before a
resume, prune after the search."""

from __future__ import annotations

import json
import re
from typing import Any

from lrsearch.engine.protocol import REPLAY_FILE
from lrsearch.infra.storage import filesystem, listing


def checkpoint_dirs(fs: Any, trial_dir: str) -> dict[int, str]:
    """``{N: path}`` of a trial's ``checkpoint_NNNNNN`` directories."""
    numbered = ((re.fullmatch(r"checkpoint_(\d+)", name), path)
                for name, path in listing(fs, trial_dir, dirs=True).items())
    return {int(match[1]): path for match, path in numbered if match}


def keep_latest_checkpoint() -> Any:
    """A Tune callback that deletes a trial's previous checkpoint once it has saved a new one.

    This is what ``CheckpointConfig(num_to_keep=1)`` does, at O(1) per checkpoint: given
    ``num_to_keep``, Tune also saves the whole experiment state (every trial's) after each trial's
    checkpoint, which made a search O(trials^2) (BENCHMARKS.md, scale). A driver killed between two
    of Tune's own periodic saves leaves a state naming a deleted checkpoint, which
    :func:`fill_replaced_checkpoints` repairs before a resume.
    """
    from ray.tune import Callback

    class KeepLatestCheckpoint(Callback):
        def __init__(self) -> None:
            self.latest: dict[str, Any] = {}

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
            previous = self.latest.pop(trial.trial_id, None)
            self.latest[trial.trial_id] = checkpoint
            if previous is not None and previous.path != checkpoint.path:
                try:
                    previous.filesystem.delete_dir(previous.path)
                except (FileNotFoundError, OSError):
                    pass  # gone already: nothing to free

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.latest.pop(trial.trial_id, None)  # its last checkpoint stays; the map stays small

    return KeepLatestCheckpoint()


def fill_replaced_checkpoints(tune_path: str, epochs: list[int]) -> None:
    """Make every checkpoint an interrupted search's saved state can name restorable.

    Tune saves the search's state (which checkpoint each trial resumes from) every 10 s or so,
    but deletes a trial's previous checkpoint as soon as the next one is registered
    (``num_to_keep=1``). A driver killed in between leaves a state naming a checkpoint that is
    gone, and the trial would fail to restore (ray-project/ray#27790). A trial's checkpoint
    ``N`` holds epoch ``epochs[N]`` (the epochs the job's ``search.checkpoint`` policy saves at),
    so each missing one below the newest becomes a ``replay.json`` that tells
    :func:`~lrsearch.engine.trial.run_trial` to retrain up to that epoch.
    """
    fs, base = filesystem(tune_path)
    for trial_dir in listing(fs, base, dirs=True).values():
        found = checkpoint_dirs(fs, trial_dir)
        for index in range(max(found, default=-1)):
            if index not in found:
                missing = f"{trial_dir}/checkpoint_{index:06d}"
                fs.create_dir(missing)
                with fs.open_output_stream(f"{missing}/{REPLAY_FILE}") as f:
                    f.write(json.dumps({"epoch": epochs[index]}).encode())


def prune_checkpoints(trial_paths: dict[str, str], keep: str, best_id: str | None) -> None:
    """Free the disk the finished search no longer needs (a fine-tuned model per trial adds up).

    Args:
        trial_paths: ``{trial_id: trial directory}``.
        keep: ``all``, ``best`` (the best trial's last checkpoint) or ``none``.
        best_id: the best trial's id.
    """
    if keep == "all":
        return
    for trial_id, path in trial_paths.items():
        fs, trial_dir = filesystem(path)
        found = checkpoint_dirs(fs, trial_dir)
        if keep == "best" and trial_id == best_id and found:
            del found[max(found)]  # its final state stays
        for ckpt in found.values():
            fs.delete_dir(ckpt)
