"""The Task interface and its evaluation, shared by the range test, trials and the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrsearch.optim.batches import move_to_device


@dataclass
class Task:
    """A fine-tuning problem.

    Attributes:
        name: shown in tables and plots.
        build_model: returns a fresh model (pretrained weights loaded) on each call.
        train_loader: yields ``(inputs, targets)`` batches.
        val_loader: yields ``(inputs, targets)`` batches for evaluation.
        criterion: ``criterion(outputs, targets) -> loss``.
        metric: name of the validation metric (``"accuracy"`` or ``"loss"``).
        mode: ``"max"`` if a larger metric is better, else ``"min"``.
        layer_groups: optional; splits a model's parameters into groups ordered from the input
            (embeddings / stem) to the output (head), for layer-wise LR decay. Must be picklable
            (a module-level function).
        test_loader: optional; held-out ``(inputs, targets)`` batches, disjoint from the train and
            validation data. The search never reads it; only a final run (:func:`lrsearch.train`)
            scores on it.
        evaluate_fn: optional; ``evaluate_fn(model, loader, device, autocast) -> metrics`` replaces
            :func:`evaluate`'s loss and accuracy (called in eval mode, without gradients); the
            metrics hold ``"loss"`` and :attr:`metric`. Must be picklable (a module-level function).
    """

    name: str
    build_model: Callable[[], nn.Module]
    train_loader: Iterable
    val_loader: Iterable
    criterion: Callable[[Any, torch.Tensor], torch.Tensor]
    metric: str = "accuracy"
    mode: str = "max"
    layer_groups: Callable[[nn.Module], list[list[nn.Parameter]]] | None = None
    test_loader: Iterable | None = None
    evaluate_fn: Callable[[nn.Module, Iterable, torch.device | str, Callable[[], Any]],
                          dict[str, float]] | None = None


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, device: torch.device | str = "cpu", *,
             loader: Iterable | None = None,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``loader`` (default ``task.val_loader``), computed
    under ``autocast`` (the training recipe's precision); or what ``task.evaluate_fn`` computes."""
    was_training = model.training
    model.eval()
    if task.evaluate_fn is not None:
        metrics = task.evaluate_fn(model, task.val_loader if loader is None else loader, device, autocast)
        model.train(was_training)
        return metrics
    loss_sum, correct, count = 0.0, 0, 0
    for batch in task.val_loader if loader is None else loader:
        inputs, targets = move_to_device(batch, device)
        with autocast():
            outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        logits = getattr(outputs, "logits", outputs).float()
        loss_sum += float(task.criterion(logits, targets)) * len(targets)
        correct += int((logits.argmax(dim=-1) == targets).sum())
        count += len(targets)
    model.train(was_training)
    return {"loss": loss_sum / max(1, count), "accuracy": correct / max(1, count)}


def reseed(task: Task, seed: int) -> None:
    """Seed torch and the training loader's shuffling, so that what a run sees does not depend on
    what ran before it in the same process (Ray reuses workers across trials)."""
    torch.manual_seed(seed)
    generator = getattr(task.train_loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
