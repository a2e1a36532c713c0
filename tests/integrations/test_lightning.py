"""lrsearch.integrations.lightning: a LightningModule + LightningDataModule searched for real on a
local Ray with ASHA and MLflow (the checks every loop on the trial protocol passes), its range test,
a killed search resumed, and bad factories."""

from __future__ import annotations

import copy
import textwrap
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import mlflow_uri
from protocol_checks import (
    assert_asha_stopped_some,
    assert_schedules,
    finish,
    kill_when,
    run_script,
    tune_saved,
)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lrsearch
from lrsearch.engine.protocol import TrialPlan
from lrsearch.errors import ConfigError, TaskError
from lrsearch.integrations import lightning as lrs_pl
from lrsearch.output.results import TrialState
from lrsearch.range_test.finder import find_lr

STEPS = 8  # optimizer steps per epoch: 512 examples in batches of 64


def _data(n: int = 512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    return x, y


class MLP(L.LightningModule):
    """A module as users write them: logs train_loss per epoch, val_acc / val_loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):  # the user's own; every trial replaces it
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Digits(L.LightningDataModule):
    def setup(self, stage: str) -> None:
        x, y = _data()
        self.train, self.val = TensorDataset(x, y), TensorDataset(x[:256], y[:256])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=256)


torch.manual_seed(0)
PRETRAINED = MLP()  # "the pretrained model" a user holds; the factory copies it


def make_module() -> MLP:
    return copy.deepcopy(PRETRAINED)


def _job(tmp_path, name, **search):
    return {
        "name": name,
        "space": {"family": "default", "schedules": ["cosine", "linear", "one_cycle"],
                  "max_lr": {"low": 1e-3, "high": 0.1}},
        "range_test": {"num_steps": 20},
        "search": {"num_trials": 6, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2,
                   "max_concurrent_trials": 2, **search},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"uri": mlflow_uri(tmp_path), "experiment": name},
    }


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


@pytest.fixture(scope="module")
def searched(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning")
    before = _state(PRETRAINED)
    result = lrs_pl.search(_job(tmp, "lightning-mlp"), make_module, Digits)
    return tmp, result, before


def test_a_lightning_search_runs_each_trial_as_a_trainer_fit(searched):
    tmp, result, _ = searched
    assert result.metric == "val_accuracy" and result.mode == "max"  # val_acc answers to accuracy
    assert len(result.trials) == 6 and all(t.state is not TrialState.ERRORED for t in result.trials)
    best = result.best
    assert best is not None and best.search_horizon["total_steps"] == STEPS * 4
    completed = [t for t in result.trials if t.state is TrialState.COMPLETED]
    assert best.value == max(t.metric_per_epoch[-1] for t in completed) and best.value > 0.5
    assert best.trial_id in {t.trial_id for t in completed}
    assert best.train == {"max_grad_norm": 1.0, "precision": "fp32", "gradient_accumulation_steps": 1}


def test_each_trials_lr_at_every_step_is_its_schedules(searched):
    tmp, result, _ = searched
    assert_schedules(f"sqlite:///{tmp}/mlruns.db", result, STEPS)


def test_asha_stops_trials_of_a_lightning_search(searched):
    assert_asha_stopped_some(searched[1])


def test_the_range_test_ran_on_the_module_and_left_the_users_instance_as_it_was(searched):
    _, result, before = searched
    rt = result.range_test
    assert rt is not None and len(rt["lrs"]) >= 10 and rt["bounds"][0] < rt["bounds"][1]
    # the search's first trial is the range test's suggestion
    assert not any("range test: off" in n for n in result.notes)
    _assert_same(PRETRAINED, before)
    assert PRETRAINED.training and "configure_optimizers" not in vars(PRETRAINED)
    assert PRETRAINED._trainer is None


def test_a_range_test_on_a_module_instance_restores_its_state_exactly(tmp_path):
    # the factory hands out the user's own instance: the range test runs on it, on the driver
    torch.manual_seed(1)
    held = MLP()
    params = list(held.parameters())
    held.net[0].weight.requires_grad_(False)
    before = _state(held)
    job = lrsearch.load_job(_job(tmp_path, "rt") | {"range_test": {"num_steps": 30, "end_lr": 1.0}})
    task = lrs_pl.RangeTestTask(lambda: held, Digits)()
    _, result = find_lr(job, task=task)
    assert len(result.lrs) >= 10 and result.suggest("valley") is not None  # it trained
    _assert_same(held, before)
    assert before["net.1.num_batches_tracked"] == 0  # the BatchNorm statistics too
    # the same Parameter objects (an optimizer elsewhere may hold them); lr_range_test leaves the
    # last sweep step's .grad on them, which no state_dict holds
    assert all(a is b for a, b in zip(held.parameters(), params, strict=True))
    assert held.training and not held.net[0].weight.requires_grad and held.device.type == "cpu"


def test_logged_metric_names_map_to_the_protocols():
    t = torch.tensor
    got = lrs_pl.reported_metrics({"loss": t(9.0), "val_loss": t(0.5), "val/acc": t(0.8),
                                   "train_loss_step": t(1.0), "train_loss_epoch": t(0.7),
                                   "validation_f1": 0.6, "hist": t([1.0, 2.0]), "flag": True})
    assert got == pytest.approx({"val_loss": 0.5, "val_acc": 0.8, "val_accuracy": 0.8, "train_loss": 0.7,
                                 "val_f1": 0.6})
    assert lrs_pl.reported_metrics({"accuracy": t(0.5)}) == {"val_accuracy": 0.5}


def test_an_objective_the_module_never_logs_is_named_with_what_it_logged():
    job = lrsearch.load_job({"name": "t", "search": {"max_epochs": 2}})
    plan = TrialPlan.of(job.train, job.optimizer, job.search)
    trial = lrsearch.Trial({"max_lr": 1e-3, "schedule": "linear"}, plan, metric="accuracy",
                           device=torch.device("cpu"))
    trainer = SimpleNamespace(current_epoch=0, callback_metrics={"val_loss": torch.tensor(0.4)})
    with pytest.raises(TaskError, match=r"the objective 'val_accuracy' is not among the metrics the "
                                        r"module logged \(val_loss\); log it in validation_step"):
        lrs_pl.Reporter(trial).on_train_epoch_end(trainer, None)


class Exploding(MLP):
    """Its loss turns NaN at a high peak LR: the trial stops at once; the search goes on."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.optimizers[0].defaults["lr"] > 1e-2 else loss


def test_a_diverging_lightning_trial_stops_its_trial_not_the_search(local_ray, tmp_path):
    job = _job(tmp_path, "pl-explode", num_trials=2, max_epochs=1, early_stopping="none",
               start_points=[{"max_lr": 0.05, "schedule": "linear"}, {"max_lr": 1e-3, "schedule": "linear"}])
    result = lrs_pl.search(job, Exploding, Digits, range_test=False, track=False)
    by_lr = {t.max_lr: t for t in result.trials}
    assert by_lr[0.05].state is TrialState.DIVERGED and by_lr[0.05].stopped_at_epoch == 1
    assert by_lr[1e-3].state is TrialState.COMPLETED and result.best.max_lr == 1e-3
    assert result.range_test is None


class ManualMLP(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_bad_factories_fail_with_one_clear_error_before_anything_trains(tmp_path):
    job = _job(tmp_path, "bad")
    with pytest.raises(ConfigError, match=r"module_factory: returned a torch\.nn\.modules\.container\."
                                          r"Sequential; allowed: a lightning\.LightningModule"):
        lrs_pl.search(job, lambda: nn.Sequential(nn.Linear(8, 3)), Digits)
    with pytest.raises(ConfigError, match=r"datamodule_factory: returned a torch\.utils\.data\."
                                          r"dataloader\.DataLoader; allowed: a lightning\.LightningDataModule"):
        lrs_pl.search(job, make_module, lambda: DataLoader(TensorDataset(*_data())))
    with pytest.raises(ConfigError, match="module_factory: got a test_lightning.MLP; allowed: a zero-argument function"):
        lrs_pl.search(job, make_module(), Digits)
    with pytest.raises(ConfigError, match="module_factory: ManualMLP sets automatic_optimization = False"):
        lrs_pl.search(job, ManualMLP, Digits)
    with pytest.raises(ConfigError, match="task: not an option"):
        lrs_pl.search(job, make_module, Digits, task=lambda: None)
    assert not (tmp_path / "runs").exists()


DRIVER = """
import sys, time
import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from lrsearch.integrations import lightning as lrs_pl

class Slow(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 3)

    def on_train_start(self):
        trial = self.configure_optimizers.args[0]  # the trial this fit is (a peek, for the test)
        with open({log!r}, "a") as f:
            f.write(f"{{trial.config['max_lr']}} {{trial.start_epoch}} {{int(trial.replaying(1))}} "
                    f"{{self.trainer.max_epochs}}\\n")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_accuracy", (self.net(x).argmax(1) == y).float().mean())

    def on_validation_epoch_end(self):
        time.sleep(1.5)  # an epoch outlasts Tune's 1 s state save, so the kill finds it mid-trial

class Data(L.LightningDataModule):
    def setup(self, stage):
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=64)

result = lrs_pl.search({job}, Slow, Data, resume="--resume" in sys.argv, track=False)
print("RESULT", sum(t.state.value == "completed" for t in result.trials), len(result.trials))
"""


def test_a_killed_lightning_search_resumes_its_trials_from_their_checkpoints(tmp_path):
    job = _job(tmp_path, "pl-kill", num_trials=3, max_epochs=4, early_stopping="none", checkpoint="epoch",
               max_concurrent_trials=1) | {"range_test": {"enabled": False}}
    log = tmp_path / "starts.log"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER).format(log=str(log), job=repr(job)))
    tune_dir = tmp_path / "runs" / "pl-kill" / "tune"
    kill_when(run_script(script), lambda: tune_saved(tune_dir, 3, "checkpoint_000001"),
              "the third trial's second checkpoint")
    text = finish(run_script(script, "--resume"))
    assert "RESULT 3 3" in text, text[-3000:]
    starts = [line.split() for line in log.read_text().splitlines()]
    assert len(starts) == 4, starts
    # a trial went on from its checkpoint, training only the epochs left (or, where Tune's saved
    # state named an older checkpoint, retrained to it unreported)
    resumed = [s for s in starts if int(s[1]) > 0 or int(s[2])]
    assert resumed and all(int(s[1]) + int(s[3]) == 4 for s in starts), starts
