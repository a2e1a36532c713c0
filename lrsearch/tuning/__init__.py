"""The search, assembled on Ray Tune: one module per step.

- :mod:`~lrsearch.tuning.runner`: runs one search start to finish (orchestration only);
- :mod:`~lrsearch.tuning.setup`: results directory, MLflow parent run, range test, first trials,
  each continuing what an interrupted run left;
- :mod:`~lrsearch.tuning.tuner`: Ray start and the ``Tuner`` (searcher + scheduler);
- :mod:`~lrsearch.tuning.optuna_adapter`: the PRUNED-aware Optuna searcher, importances;
- :mod:`~lrsearch.tuning.checkpoints`: the resume repair and the post-search pruning;
- :mod:`~lrsearch.output.results`: typed trial records, the best config, the files;
- :mod:`~lrsearch.tuning.track`: what the MLflow parent run gets;
- :mod:`~lrsearch.tuning.progress`, :mod:`~lrsearch.tuning.interrupt`: terminal and Ctrl+C.

(The package is not called ``search``: ``lrsearch.search`` is the public function.)
"""

from lrsearch.output.results import BestConfig, SearchResult, TrialRecord, TrialState
from lrsearch.tuning.runner import run_search

__all__ = ["BestConfig", "SearchResult", "TrialRecord", "TrialState", "run_search"]
