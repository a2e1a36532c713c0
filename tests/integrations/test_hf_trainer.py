"""lrsearch.integrations.transformers: a Hugging Face Trainer on MiniLM (its first layer) searched for
real (local Ray, ASHA, MLflow), with model_init and lrsearch's own schedules, resumed after a kill, and
a training script written the way the transformers docs show searched without changing it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import minilm_l1, mlflow_uri
from protocol_checks import (
    assert_asha_stopped_some,
    assert_schedules,
    finish,
    kill_when,
    run_script,
    tune_saved,
)
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import lrsearch
from lrsearch.integrations import transformers as lrs_hf
from lrsearch.output.results import TrialState

MINILM = minilm_l1()  # MiniLM's first layer: a fraction of its step time here
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer" / "train.py"
TEXTS = [("the kernel panicked at boot", 0), ("a poem about the sea", 1), ("vote for the senator", 2),
         ("compile the source again", 0), ("roses are red, violets blue", 1), ("the election was close", 2)]


class Rows(torch.utils.data.Dataset):
    """Any torch Dataset of dicts (not a datasets.Dataset)."""

    def __init__(self, tokenizer, n):
        self.rows = [dict(tokenizer(TEXTS[i % 6][0] + f" {i}", truncation=True, max_length=16),
                          labels=TEXTS[i % 6][1]) for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def make_trainer(model_init: bool = False) -> Trainer:
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    args = TrainingArguments(output_dir="out", per_device_train_batch_size=16, per_device_eval_batch_size=32,
                             report_to=[], use_cpu=True, seed=0)
    build = lambda: AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=3)  # noqa: E731
    return Trainer(model=None if model_init else build(), model_init=build if model_init else None,
                   args=args, train_dataset=Rows(tokenizer, 64), eval_dataset=Rows(tokenizer, 32),
                   data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)


def make_trainer_with_model_init() -> Trainer:
    return make_trainer(model_init=True)


def make_lora_trainer() -> Trainer:
    """The same Trainer on a PEFT LoRA model, the way the peft docs build one."""
    from peft import LoraConfig, TaskType, get_peft_model

    trainer = make_trainer()
    torch.manual_seed(0)
    trainer.model = get_peft_model(trainer.model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8))
    return trainer


def _job(tmp, name, **search):
    return {"name": name, "space": {"family": "bert", "max_lr": {"low": 3e-5, "high": 3e-3}},
            "search": {"num_trials": 4, "max_epochs": 4, "max_concurrent_trials": 2, **search},
            "storage": {"path": str(tmp / "runs")},
            "tracking": {"uri": mlflow_uri(tmp), "experiment": name}}


@pytest.fixture(scope="module")
def searched(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    return tmp, lrs_hf.search(_job(tmp, "hf-minilm"), make_trainer)


def test_a_trainer_search_runs_each_trial_as_the_users_trainer(searched):
    tmp, result = searched
    assert result.metric == "val_accuracy" and result.mode == "max"  # compute_metrics' accuracy
    assert result.range_test is not None and result.range_test["bounds"][0] < result.range_test["bounds"][1]
    assert len(result.trials) == 4 and not [t for t in result.trials if t.state is TrialState.ERRORED]
    assert result.best.search_horizon["total_steps"] == 4 * 4  # 64 / 16 steps per epoch, 4 epochs


def test_each_trials_lr_at_every_step_is_its_schedule(searched):
    tmp, result = searched
    assert_schedules(f"sqlite:///{tmp}/mlruns.db", result, steps_per_epoch=4)


def test_asha_stops_trainer_trials(searched):
    assert_asha_stopped_some(searched[1])


def test_the_best_trials_model_and_training_arguments_come_back(searched):
    _, result = searched
    assert isinstance(result, lrsearch.SearchResult)
    args = result.training_args
    assert isinstance(args, TrainingArguments) and args.learning_rate == pytest.approx(result.best.max_lr)
    assert args.per_device_train_batch_size == 16  # the user's own arguments otherwise
    fresh = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=3)
    trained = result.model.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items() if k.startswith("classifier"))


def test_model_init_combines_with_lrsearchs_own_schedules(local_ray, tmp_path):
    job = _job(tmp_path, "hf-init", num_trials=2, max_epochs=2, early_stopping="none",
               start_points=[{"max_lr": 1e-4, "schedule": "stlr", "cut_frac": 0.2, "ratio": 32},
                             {"max_lr": 5e-5, "schedule": "one_cycle", "pct_start": 0.3, "div_factor": 25}])
    result = lrs_hf.search(job, make_trainer_with_model_init, range_test=False)
    assert {t.schedule for t in result.trials} == {"stlr", "one_cycle"}
    assert all(t.state is TrialState.COMPLETED for t in result.trials)
    assert_schedules(f"sqlite:///{tmp_path}/mlruns.db", result, steps_per_epoch=4)


def test_a_lora_trainer_checkpoints_only_its_adapters_and_head(local_ray, tmp_path):
    from peft import PeftModel

    job = _job(tmp_path, "hf-lora", num_trials=2, max_epochs=2, early_stopping="none", checkpoint="epoch")
    job["space"] = {"family": "lora"}
    result = lrs_hf.search(job, make_lora_trainer, range_test=False)
    assert all(t.state is TrialState.COMPLETED for t in result.trials)
    full = sum(v.numel() * v.element_size() for v in make_trainer().model.state_dict().values())
    # two checkpoints a trial (epochs 1 and 2), each of the adapters, the head and the optimizer state
    assert all(0 < t.checkpoint_bytes < 0.05 * full for t in result.trials), [t.checkpoint_bytes for t in result.trials]
    assert isinstance(result.model, PeftModel) and 1e-4 <= result.best.max_lr <= 1e-3
    assert_schedules(f"sqlite:///{tmp_path}/mlruns.db", result, steps_per_epoch=4)


def test_a_docs_style_script_becomes_a_factory_without_changes():
    trainer = lrs_hf.from_script(EXAMPLE, "--num-train", "32", "--epochs", "1", "--model", MINILM)()
    assert isinstance(trainer, Trainer) and trainer.state.global_step == 0  # built, not trained
    assert len(trainer.train_dataset) == 32 and trainer.compute_metrics is not None


def test_the_docs_style_script_is_searched_unchanged(local_ray, tmp_path):
    make = lrs_hf.from_script(EXAMPLE, "--num-train", "32", "--epochs", "1", "--model", MINILM)
    result = lrs_hf.search(_job(tmp_path, "hf-script", num_trials=2, max_epochs=2, early_stopping="none"), make)
    assert result.range_test is not None and all(t.state is TrialState.COMPLETED for t in result.trials)
    assert_schedules(f"sqlite:///{tmp_path}/mlruns.db", result, steps_per_epoch=2)  # 32 texts, batch 16
    assert result.training_args.output_dir == "minilm-fortunes"  # the script's own arguments


def test_bad_factories_fail_before_anything_trains(tmp_path):
    with pytest.raises(lrsearch.ConfigError, match="trainer_factory: returned int"):
        lrs_hf.search(_job(tmp_path, "bad"), lambda: 3)
    with pytest.raises(lrsearch.ConfigError, match="from_script: .* is not a file"):
        lrs_hf.from_script(tmp_path / "nope.py")
    assert not (tmp_path / "runs").exists()


DRIVER = """
import sys
sys.path[:0] = [{here!r}, {tests!r}]  # this module, and protocol_checks beside conftest
from test_hf_trainer import make_trainer
from lrsearch.integrations import transformers as lrs_hf

result = lrs_hf.search({job}, make_trainer, range_test=False, resume="--resume" in sys.argv)
print("RESULT", sum(t.state.value == "completed" for t in result.trials), len(result.trials))
"""


def test_a_killed_trainer_search_resumes(tmp_path):
    job = _job(tmp_path, "hf-kill", num_trials=3, max_epochs=4, early_stopping="none", checkpoint="epoch",
               max_concurrent_trials=1)
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER).format(here=str(Path(__file__).parent), tests=str(Path(__file__).parents[1]), job=json.dumps(job)))
    tune_dir = tmp_path / "runs" / "hf-kill" / "tune"
    kill_when(run_script(script), lambda: tune_saved(tune_dir, 2, "checkpoint_000001"),
              "the second trial's second checkpoint")
    text = finish(run_script(script, "--resume"))
    assert "RESULT 3 3" in text, text[-3000:]
