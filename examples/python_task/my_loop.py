"""Bring your own training loop: a function returning ``train_fn(trial)``, which trains one trial.

The loop is plain PyTorch: the same CNN on scikit-learn's digits as ``my_task.py``, written as
you would write it yourself. It takes its optimizer and schedule from the ``lrsearch.Trial`` and
reports after every epoch; lrsearch does the rest (ASHA, MLflow, checkpoints, resume).
"""

from __future__ import annotations

import torch
from my_task import build
from torch.nn import functional as F

import lrsearch


def train_fn(batch_size: int = 32, seed: int = 0):
    def loop(trial: lrsearch.Trial) -> None:
        data = build(batch_size=batch_size, seed=seed)   # reuse the task's data and model only
        model = data.build_model().to(trial.device)
        optimizer = trial.optimizer(model)
        scheduler = trial.scheduler(optimizer, total_steps=len(data.train_loader) * trial.max_epochs)
        for epoch in range(trial.start_epoch, trial.max_epochs):
            model.train()
            for x, y in data.train_loader:
                loss = F.cross_entropy(model(x.to(trial.device)), y.to(trial.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                if trial.diverging(loss.item()):
                    trial.report(epoch + 1, diverged=True)
                    return
            model.eval()
            with torch.no_grad():
                right = sum(int((model(x.to(trial.device)).argmax(1) == y.to(trial.device)).sum())
                            for x, y in data.val_loader)
            accuracy = right / len(data.val_loader.dataset)
            if trial.report(epoch + 1, accuracy=accuracy, train_loss=loss.item()):
                return

    return loop
