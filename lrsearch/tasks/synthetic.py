"""A tiny synthetic classification task for fast tests and the quick demo.

It is *synthetic*: Gaussian clusters and a small MLP trained from scratch, no pretrained weights.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrsearch.tasks.base import Task


def _mlp(num_features: int, num_classes: int, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def synthetic_task(
    *,
    num_train: int = 2048,
    num_val: int = 512,
    num_test: int = 512,
    num_features: int = 32,
    num_classes: int = 8,
    hidden: int = 64,
    batch_size: int = 64,
    noise: float = 2.0,
    seed: int = 0,
) -> Task:
    """Gaussian clusters (one per class) in ``num_features`` dimensions and a 2-hidden-layer MLP.

    The train, validation and test sets are drawn in that order from one generator, so the test
    split (``num_test``; 0 for none) leaves the other two as they were without it."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, num_features, generator=gen) * 1.5

    def sample(n: int) -> TensorDataset:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        x = centers[y] + noise * torch.randn(n, num_features, generator=gen)
        return TensorDataset(x, y)

    train, val = sample(num_train), sample(num_val)
    test = sample(num_test) if num_test else None
    return Task(
        name="synthetic",
        build_model=partial(_mlp, num_features, num_classes, hidden, seed),
        train_loader=DataLoader(train, batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed)),
        val_loader=DataLoader(val, batch_size=256),
        criterion=nn.CrossEntropyLoss(),
        test_loader=DataLoader(test, batch_size=256) if test is not None else None,
    )
