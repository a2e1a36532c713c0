"""Bring your own model: a function returning an ``lrsearch.tasks.Task``.

Here: scikit-learn's digits (8x8 images, shipped offline) with a small CNN. Replace the body with
your own pretrained model and data loaders. ``build_model`` must return a fresh model on every
call and be picklable (a module-level function, or functools.partial of one): Ray rebuilds the
task on each worker from the job file, so the module must be importable there too (it sits next to
the job file; ``lrsearch submit`` ships it).
"""

from __future__ import annotations

from functools import partial

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.tasks import Task


def small_cnn(num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def build(batch_size: int = 32, num_val: int = 300, num_test: int = 300, seed: int = 0) -> Task:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    # three disjoint parts: validation (the search picks by it), test (only `lrsearch train` scores
    # it), and the rest to train on
    val, test, train = order[:num_val], order[num_val:num_val + num_test], order[num_val + num_test:]
    return Task(
        name="digits-cnn",
        build_model=partial(small_cnn, 10, seed),
        train_loader=DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed)),
        val_loader=DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
        test_loader=DataLoader(TensorDataset(x[test], y[test]), batch_size=256),
        criterion=nn.CrossEntropyLoss(),
        metric="accuracy",
        mode="max",
    )
