"""lrsearch's exceptions. The CLI prints their message (no traceback) and exits with ``exit_code``."""


class LRSearchError(Exception):
    """Base class of every error lrsearch raises on purpose."""

    #: the CLI's exit status for it
    exit_code = 2


class ConfigError(LRSearchError, ValueError):
    """Raised when a job file or an option holds a value that is not allowed.

    The message names the field, the value received and what is allowed.
    """


class TaskError(LRSearchError):
    """Raised when a task cannot be built: a missing model or dataset (file or package), or data
    that does not fit the task. The message names the job field, what was found and how to fix it
    (for a missing package: the exact install command)."""


class MissingExtra(LRSearchError, ImportError):
    """Raised when a feature needs an optional package that is not installed. The message is one
    line naming the feature, the package and the ``pip install 'lrsearch[extra]'`` that brings it
    (see :mod:`lrsearch.job.extras`)."""


class Interrupted(LRSearchError):
    """Raised when the user stopped a command (Ctrl+C); a search's state is kept for ``--resume``."""

    exit_code = 130


class SearchError(LRSearchError):
    """Raised when a search cannot start: results of a search with the same name exist (and
    ``resume`` was not asked for), or the Ray cluster named cannot be reached."""


class TrackingError(LRSearchError):
    """Raised when the MLflow tracking store cannot be reached as a search starts, or a run or
    experiment asked for does not exist."""
