"""The Task interface, and the batch helpers (:func:`move_to_device`, :func:`forward`), shared by the
range test, trials and the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


def move_to_device(obj: Any, device: torch.device | str) -> Any:
    """Move a tensor, or tensors nested in dicts/lists/tuples, to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def forward(model: nn.Module, criterion: Callable, batch: Any, device: torch.device | str) -> torch.Tensor:
    """Loss of one ``(inputs, targets)`` batch.

    ``inputs`` is a tensor (``model(inputs)``) or a mapping (``model(**inputs)``, as for Hugging
    Face models); an output with ``.logits`` is reduced to its logits before ``criterion``.
    """
    if not isinstance(batch, list | tuple) or len(batch) != 2:
        raise ValueError(
            f"a batch must be an (inputs, targets) pair; got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
        )
    inputs, targets = move_to_device(batch, device)
    outputs = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if targets is None:  # the model computes its own loss (labels inside the inputs)
        return model_loss(outputs)
    if hasattr(outputs, "logits"):
        outputs = outputs.logits
    return criterion(outputs, targets)


def model_loss(outputs: Any, _targets: Any = None) -> torch.Tensor:
    """The loss a model computed itself: ``outputs.loss`` (Hugging Face models given ``labels``),
    ``outputs["loss"]``, or the output when it is the loss (a scalar tensor). A criterion too."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None and isinstance(outputs, torch.Tensor) and outputs.ndim == 0:
        loss = outputs
    if loss is None:
        raise ValueError("a batch of (inputs, None) needs a model that returns its loss "
                         f"(outputs.loss or a scalar); got {type(outputs).__name__}")
    return loss


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
