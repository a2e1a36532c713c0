"""TPE at a flat cost per trial: past ``size`` trials it sees the newest ones and the best ones.

Optuna's TPE builds its Parzen estimators from every finished trial, so each suggestion costs
O(trials) and a search O(trials^2): 62 ms per suggestion at 150 trials, 155 ms at 950 here
(BENCHMARKS.md, scale). Its default weights already discount the old trials, and its "good" group
is the best ``min(10 %, 25)``: a view of the newest ``size`` trials plus the best ``best`` of the
older ones keeps both, at a cost that stops growing. Up to ``size`` trials the view is the whole
study and the suggestions are TPE's own, draw for draw.
"""

from __future__ import annotations

import heapq
from typing import Any

from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import TrialState

#: trials TPE sees in full; the rest are summarised by the best of them
WINDOW = 256
#: TPE's "good" group is at most 25 trials (``default_gamma``)
BEST = 25


class _View:
    """A study whose trial lists hold the newest ``size`` trials and the ``best`` completed older
    ones, in trial order; everything else is the study's.

    The older trials' best are kept in ``memo`` and updated with the trials that left the window
    since the last call: O(new trials) per call, not O(trials).
    """

    def __init__(self, study: Any, size: int, best: int, memo: dict) -> None:
        self._study, self._size, self._best, self._memo = study, size, best, memo

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[Any]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)  # noqa: SLF001
        cut = len(trials) - self._size
        if cut <= 0:
            return trials
        key = (deepcopy, tuple(states) if states is not None else None)
        seen, kept = self._memo.get(key, (0, []))
        left = [t for t in trials[seen:cut] if t.state == TrialState.COMPLETE and t.value is not None]
        if left:
            maximize = self._study.direction == StudyDirection.MAXIMIZE
            pick = heapq.nlargest if maximize else heapq.nsmallest
            kept = pick(self._best, [*kept, *left], key=lambda t: t.value)
        self._memo[key] = (max(seen, cut), kept)
        newest = trials[cut:]
        first = newest[0].number
        return sorted((t for t in kept if t.number < first), key=lambda t: t.number) + newest

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return self._get_trials(deepcopy=deepcopy, states=states)


class WindowedSampler(BaseSampler):
    """``sampler`` (TPE) shown :class:`_View` of the study when it samples."""

    def __init__(self, sampler: BaseSampler, size: int = WINDOW, best: int = BEST) -> None:
        self._sampler, self._size, self._best = sampler, size, best
        self._memo: dict = {}

    def _view(self, study: Any) -> _View:
        return _View(study, self._size, self._best, self._memo)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self._sampler.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._sampler.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._sampler.sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._sampler.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: TrialState, values: Any) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()
