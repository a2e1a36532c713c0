"""How a batch meets a model: moved to its device, through the model, to a loss. Shared by the
range test, the recipe's steps, the evaluation and the integrations."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["forward", "model_loss", "move_to_device"]


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
