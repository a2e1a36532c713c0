"""lrsearch's exceptions. The CLI prints their message on one line and exits with code 2."""


class LRSearchError(Exception):
    """Base class of every error lrsearch raises on purpose."""


class ConfigError(LRSearchError, ValueError):
    """Raised when a job file or an option holds a value that is not allowed.

    The message names the field, the value received and what is allowed.
    """


class TaskError(LRSearchError):
    """Raised when a task cannot be built: a missing model or dataset (file or package), or data
    that does not fit the task. The message names the job field, what was found and how to fix it
    (for a missing package: the exact install command)."""
