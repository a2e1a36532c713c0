"""The final run (``lrsearch train``): the search's best config trained at the user's horizon.

:mod:`~lrsearch.final.driver` reads the search back (:mod:`~lrsearch.final.found`), checks the
options and the horizon, opens the MLflow run and hands the training to one Ray task
(:mod:`~lrsearch.final.worker`); :mod:`~lrsearch.final.state` keeps the files a killed run resumes
from.
"""

from lrsearch.final.driver import FinalResult, run_final

__all__ = ["FinalResult", "run_final"]
