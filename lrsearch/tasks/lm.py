"""Language modeling: a pretrained Hugging Face causal LM (GPT-2 style) fine-tuned on plain text.

The texts come from the datasets the text classification task reads (:func:`lrsearch.tasks.text.load_texts`:
Debian fortunes by default, or a CSV, JSON-lines or Parquet file); their labels are ignored. The
model is a local directory or a hub id (read from the local cache only when ``HF_HUB_OFFLINE=1``);
``examples/causal_lm/make_tiny_gpt2.py`` writes a tiny GPT-2 and its tokenizer for offline use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.errors import ConfigError, TaskError
from lrsearch.job.extras import require
from lrsearch.optim.batches import move_to_device
from lrsearch.tasks.base import Task
from lrsearch.tasks.text import check_sizes, collate_text, load_texts, split_indices
from lrsearch.tasks.text_model import (
    MODEL_ALIASES,
    _quiet_transformers,
    load_tokenizer,
    resolve_model,
    warn_random_weights,
)

__all__ = ["IGNORE_INDEX", "METRICS", "causal_lm_loss", "decoder_layer_groups", "evaluate_lm",
           "language_modeling_task", "load_causal_lm"]

#: the label of a padding position: no loss there (PyTorch's and Hugging Face's convention)
IGNORE_INDEX = -100
METRICS = ("loss", "perplexity")


def language_modeling_task(
    *,
    model: str,
    dataset: str = "fortunes",
    categories: list[str] | None = None,
    text_column: str = "text",
    num_train: int = 512,
    num_val: int = 256,
    num_test: int = 256,
    max_length: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    metric: str = "loss",
) -> Task:
    """Fine-tune a pretrained causal language model on texts (next-token prediction).

    The texts are shuffled by ``seed`` and split into ``num_train`` training, ``num_val``
    validation and ``num_test`` test texts (as in
    :func:`~lrsearch.tasks.text.text_classification_task`), each ended with the tokenizer's
    end-of-text token and tokenized once (padded and truncated to ``max_length``). Batches are
    ``({"input_ids": ..., "attention_mask": ...}, labels)`` with ``labels`` the input ids and
    :data:`IGNORE_INDEX` at the padding.

    Args:
        model: a local directory holding a Hugging Face causal LM and its tokenizer, or a hub id.
        dataset: ``"fortunes"`` (Debian ``fortunes``) or the path of a ``.csv``, ``.jsonl`` /
            ``.json`` (JSON lines) or ``.parquet`` file.
        categories: fortune categories to read, at least one; default
            :data:`~lrsearch.tasks.text.DEFAULT_CATEGORIES`. Only for ``dataset="fortunes"``.
        text_column: column of a data file holding the texts.
        num_train: training texts; fewer are used (with a warning) if the data is short.
        num_val: validation texts; shrunk in proportion with ``num_train`` if the data is short.
        num_test: held-out test texts (0 for none); only a final run (``lrsearch train``) scores them.
        max_length: tokens per text after padding and truncation.
        batch_size: texts per batch in every loader.
        seed: shuffles the split and the training batches.
        metric: ``"loss"`` (mean cross-entropy per real token) or ``"perplexity"`` (its exp);
            lower is better for both.

    Returns:
        A :class:`Task` named like ``"tiny-gpt2/fortunes"``, with :func:`causal_lm_loss`,
        :func:`evaluate_lm` and :func:`decoder_layer_groups`.

    Raises:
        TaskError: the model or the dataset cannot be found or read, or the data is too short.
        ConfigError: a size is too small, or ``metric`` is not one of :data:`METRICS`.

    Example::

        task = language_modeling_task(model="path/to/tiny-gpt2", num_train=64, num_val=32)
        model = task.build_model()
        inputs, labels = next(iter(task.train_loader))
        loss = task.criterion(model(**inputs).logits, labels)
    """
    check_sizes(num_train=num_train, num_val=num_val, num_test=num_test, max_length=max_length,
                batch_size=batch_size)
    if metric not in METRICS:
        raise ConfigError(f"task.metric: got {metric!r}; allowed: {', '.join(map(repr, METRICS))}")
    if model in MODEL_ALIASES:
        raise TaskError(f"task.model: got {model!r}, an encoder for text_classification; "
                        "allowed: a causal LM (GPT-2 style): a local model directory or a hub id")

    texts, data_name = load_texts(dataset, categories, text_column)
    train_idx, val_idx, test_idx = split_indices(len(texts), num_train, num_val, num_test, seed, dataset)

    name_or_path, model_name, local_only = resolve_model(model)
    tokenizer = load_tokenizer(name_or_path, model, local_only)
    tokenizer.padding_side = "right"  # GPT-2 counts positions from the left: real tokens first
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and max_length > limit:
        raise TaskError(f"task.max_length: got {max_length}; model {model!r} reads at most {limit} tokens")

    def encode(indices: list[int]) -> TensorDataset:
        # the end-of-text token is a real token: the model learns where a text stops
        enc = tokenizer([texts[i] + tokenizer.eos_token for i in indices], padding="max_length",
                        truncation=True, max_length=max_length, return_tensors="pt")
        # padding is end-of-text too: the attention mask, not the token id, tells them apart
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
        return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    return Task(
        name=f"{model_name}/{data_name}",
        build_model=partial(load_causal_lm, name_or_path, local_only, tokenizer.pad_token_id, model),
        train_loader=DataLoader(encode(train_idx), batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed), collate_fn=collate_text),
        val_loader=DataLoader(encode(val_idx), batch_size=batch_size, collate_fn=collate_text),
        criterion=causal_lm_loss,
        metric=metric,
        mode="min",
        layer_groups=decoder_layer_groups,
        test_loader=(DataLoader(encode(test_idx), batch_size=batch_size, collate_fn=collate_text)
                     if test_idx else None),
        evaluate_fn=evaluate_lm,
    )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a batch.

    The logits at position ``t`` predict the label at ``t + 1``; labels equal to
    :data:`IGNORE_INDEX` (padding) count nothing. The same value as a Hugging Face causal LM's own
    ``model(input_ids, labels=labels).loss``.

    Args:
        logits: ``FloatTensor[B, L, V]``.
        labels: ``LongTensor[B, L]``, the input ids with :data:`IGNORE_INDEX` at the padding.
    """
    return F.cross_entropy(_shifted_logits(logits), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def evaluate_lm(model: nn.Module, loader: Iterable, device: torch.device | str,
                autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """``{"loss", "perplexity"}`` of a causal LM on ``loader``: the mean cross-entropy over all
    real (non-padding, shifted) tokens of all batches, and its exp.

    A :attr:`lrsearch.Task.evaluate_fn`: :func:`lrsearch.tasks.evaluate` calls it in eval mode,
    without gradients.
    """
    loss_sum, count = 0.0, 0
    for batch in loader:
        inputs, labels = move_to_device(batch, device)
        with autocast():
            logits = model(**inputs).logits
        targets = labels[:, 1:].reshape(-1)
        loss_sum += float(F.cross_entropy(_shifted_logits(logits), targets, ignore_index=IGNORE_INDEX,
                                          reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    loss = loss_sum / max(1, count)
    # exp(700) is still a float: a wildly untrained model gets a huge perplexity, not an OverflowError
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def _shifted_logits(logits: torch.Tensor) -> torch.Tensor:
    # float32 like Hugging Face's loss: under bf16 autocast the logits are bf16
    return logits[:, :-1, :].float().reshape(-1, logits.size(-1))


def decoder_layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Split a causal LM's parameters from the input to the output.

    GPT-2 style (``transformer.wte`` / ``wpe`` and ``transformer.h``) or Llama style
    (``model.embed_tokens`` and ``model.layers``): the embeddings, then one group per block, then
    everything else (the final norm, an untied head). A head tied to the input embeddings (GPT-2)
    is one tensor, so it is in the embeddings' group. Any other model: one group with every parameter.

    Args:
        model: the model ``build_model`` returned.

    Returns:
        Lists of parameters; each parameter appears in exactly one group.
    """
    base = getattr(model, "base_model", model)
    layers = getattr(base, "h", None)
    embeddings = [getattr(base, name, None) for name in ("wte", "wpe")]
    if layers is None:
        layers = getattr(base, "layers", None)
        embeddings = [getattr(base, "embed_tokens", None)]
    embeddings = [m for m in embeddings if isinstance(m, nn.Module)]
    if not embeddings or not isinstance(layers, nn.ModuleList):
        return [list(model.parameters())]
    seen: set[int] = set()
    groups = []
    for modules in (embeddings, *([block] for block in layers), [model]):
        # the last pass over the whole model collects whatever the earlier groups left out
        group = [p for m in modules for p in m.parameters() if id(p) not in seen]
        seen.update(id(p) for p in group)
        if group:
            groups.append(group)
    return groups


def load_causal_lm(name_or_path: str, local_only: bool, pad_token_id: int | None, model: str) -> nn.Module:
    """A fresh pretrained causal LM, in training mode."""
    # imported here: transformers takes seconds to import, and is an extra
    require("transformers", what=f"task.model {model!r}")
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            net, info = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local_only,
                                                             output_loading_info=True)
    except (OSError, ValueError, KeyError) as err:  # what hub and config lookups raise on a miss
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise TaskError(f"task.model: {model!r} is neither a local directory holding a causal LM nor "
                        f"a hub id available offline ({cause})") from None
    # nothing is new in a causal LM: every missing weight starts random
    warn_random_weights(model, info["missing_keys"])
    if net.config.pad_token_id is None:
        net.config.pad_token_id = pad_token_id
    # from_pretrained returns eval mode; a model about to be fine-tuned wants dropout on
    return net.train()
