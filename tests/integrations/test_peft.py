"""LoRA (PyPI peft) through the built-in text task, for real and offline: all-MiniLM-L6-v2 on fortunes.

The job's ``task.peft`` section, the wrapped model (only the adapters and the head train), its
checkpoints (adapters and head only, loaded back into a fresh build), layer-wise LR decay on it, and
a whole search and final run on the ``lora`` space, the final model loaded back from MLflow.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from conftest import mlflow_uri
from protocol_checks import assert_asha_stopped_some, assert_schedules

import lrsearch
from lrsearch.engine import trainable_state
from lrsearch.errors import ConfigError, TaskError
from lrsearch.job.config import OptimizerConfig
from lrsearch.job.space import load_space
from lrsearch.job.task_config import PeftConfig
from lrsearch.optim.optimizers import build_optimizer
from lrsearch.tasks import build_task
from lrsearch.tasks.text import encoder_layer_groups, text_classification_task

LORA_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "lora.yaml"
PEFT = {"r": 8, "alpha": 16, "dropout": 0.1}
SMALL = {"num_train": 64, "num_val": 32, "num_test": 32, "max_length": 16, "batch_size": 16}
NUM_LAYERS = 6  # MiniLM-L6


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No test may reach the hub: transformers reads only local files."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def task():
    return text_classification_task(**SMALL, peft=PEFT)


@pytest.fixture(scope="module")
def model(task):
    return task.build_model()


def _job(**task) -> dict:
    return {"name": "lora", "task": {"kind": "text_classification", **task}}


# --------------------------------------------------------------------------------------------
# the job's task.peft section
# --------------------------------------------------------------------------------------------


def test_peft_section_parses_with_its_defaults():
    assert lrsearch.load_job(_job()).task.peft is None  # no section: full fine-tuning
    cfg = lrsearch.load_job(_job(peft={})).task.peft
    assert cfg == PeftConfig(r=8, alpha=16.0, dropout=0.1, target_modules=None)
    cfg = lrsearch.load_job(_job(peft={"r": 4, "alpha": 8, "dropout": 0.0,
                                       "target_modules": ["query", "key", "value"]})).task.peft
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules) == (4, 8.0, 0.0, ["query", "key", "value"])


@pytest.mark.parametrize(("peft", "fragments"), [
    ({"r": 0}, ["task.peft.r: got 0; allowed: a value >= 1"]),
    ({"r": 2.5}, ["task.peft.r: got 2.5", "an integer"]),
    ({"alpha": 0}, ["task.peft.alpha: got 0; allowed: a value > 0"]),
    ({"dropout": 1.0}, ["task.peft.dropout: got 1.0; allowed: a value < 1"]),
    ({"dropout": -0.1}, ["task.peft.dropout: got -0.1; allowed: a value >= 0"]),
    ({"target_modules": []}, ["task.peft.target_modules: got []", "non-empty list"]),
    ({"rank": 8}, ["task.peft.rank", "unknown field"]),
])
def test_a_bad_peft_value_is_one_error_naming_field_value_and_allowed(peft, fragments):
    with pytest.raises(ConfigError) as err:
        lrsearch.load_job(_job(peft=peft))
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message


def test_the_python_api_checks_peft_as_the_job_file_does():
    with pytest.raises(ConfigError, match=r"^task.peft.r: got 0; allowed: a value >= 1$"):
        text_classification_task(**SMALL, peft={"r": 0})
    with pytest.raises(ConfigError, match=r"task.peft.dropout: got 1.5; allowed: a value < 1"):
        text_classification_task(**SMALL, peft={"dropout": 1.5})


def test_build_task_passes_the_job_section_through():
    task = build_task(lrsearch.load_job(_job(**SMALL, peft={"r": 4})))
    assert task.name == "minilm-l6+lora-r4/fortunes"
    assert task.build_model.keywords == {"r": 4, "alpha": 16.0, "dropout": 0.1, "target_modules": None}


# --------------------------------------------------------------------------------------------
# the wrapped model
# --------------------------------------------------------------------------------------------


def test_only_the_adapters_and_the_head_train(model):
    from peft import PeftModel

    assert isinstance(model, PeftModel) and model.training
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if ".lora_" in n]
    head = [n for n in trainable if ".lora_" not in n]
    # peft's default for BERT-like models: query and value of every layer, an A and a B each
    assert len(lora) == NUM_LAYERS * 2 * 2
    assert {n.split(".attention.self.")[1].split(".")[0] for n in lora} == {"query", "value"}
    # SEQ_CLS puts the new head in modules_to_save: a trainable copy of it
    assert sorted(head) == ["base_model.model.classifier.modules_to_save.default.bias",
                            "base_model.model.classifier.modules_to_save.default.weight"]
    num_trainable = sum(p.numel() for p in trainable.values())
    num_all = sum(p.numel() for p in model.parameters())
    assert num_trainable < 0.01 * num_all  # 75 k of 22.8 M
    assert model.peft_config["default"].r == 8 and model.peft_config["default"].lora_alpha == 16


def test_a_training_step_moves_the_adapters_and_the_head_only(task):
    model = task.build_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(OptimizerConfig(), model, 1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == NUM_LAYERS * 4 + 2
    inputs, labels = next(iter(task.train_loader))
    task.criterion(model(**inputs).logits, labels).backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}


def test_two_builds_are_identical_and_the_factory_pickles(task, model):
    # the adapters' random init is seeded like the head's: every trial starts from one model
    state, other = model.state_dict(), task.build_model().state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)
    factory = pickle.loads(pickle.dumps(task.build_model))
    assert factory.keywords == task.build_model.keywords and len(pickle.dumps(task.build_model)) < 10_000


def test_layer_groups_split_the_wrapped_encoder_and_decay_the_adapters(model):
    groups = encoder_layer_groups(model)
    assert len(groups) == 1 + NUM_LAYERS + 1  # embeddings, 6 layers, pooler and head
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    for layer, group in enumerate(groups[1:-1]):
        lora = [names[id(p)] for p in group if p.requires_grad]
        assert len(lora) == 4 and all(f".layer.{layer}." in n and ".lora_" in n for n in lora)
    assert not any(p.requires_grad for p in groups[0])
    assert {names[id(p)] for p in groups[-1] if p.requires_grad} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias"}
    optimizer = build_optimizer(OptimizerConfig(), model, 1e-3, layer_groups=encoder_layer_groups,
                                layer_decay=0.5)
    lrs = sorted({g["lr"] for g in optimizer.param_groups}, reverse=True)
    assert lrs == pytest.approx([1e-3 * 0.5 ** i for i in range(NUM_LAYERS + 1)])


def test_the_checkpoint_holds_the_adapters_and_head_and_loads_back(task, tmp_path):
    trained = task.build_model()
    optimizer = build_optimizer(OptimizerConfig(), trained, 1e-3)
    for _, (inputs, labels) in zip(range(2), task.train_loader, strict=False):
        task.criterion(trained(**inputs).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = trainable_state(trained)
    frozen = {n for n, p in trained.named_parameters() if not p.requires_grad}
    assert not frozen & state.keys()
    params = {k for k in state if ".lora_" in k or ".modules_to_save." in k}
    assert params == {n for n, p in trained.named_parameters() if p.requires_grad}
    # the rest are buffers (BERT's token_type_ids), nothing trained
    assert all(k in dict(trained.named_buffers()) for k in state.keys() - params)
    torch.save(state, tmp_path / "ckpt.pt")
    torch.save(trained.state_dict(), tmp_path / "full.pt")
    assert (tmp_path / "ckpt.pt").stat().st_size < 0.02 * (tmp_path / "full.pt").stat().st_size

    fresh = task.build_model()
    inputs, _ = next(iter(task.val_loader))
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        want = trained(**inputs).logits
        assert not torch.allclose(fresh(**inputs).logits, want)
        # what lrsearch.engine.load_state does: the frozen weights come from the build
        result = fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True), strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) == frozen
        assert torch.allclose(fresh(**inputs).logits, want, atol=1e-6)


def test_target_modules_that_do_not_exist_name_the_field_and_the_choices():
    task = text_classification_task(**SMALL, peft={"target_modules": ["q_proj"]})
    with pytest.raises(TaskError, match=r"task.peft.target_modules: got \['q_proj'\].*query.*value"):
        task.build_model()


# --------------------------------------------------------------------------------------------
# a search on the lora space and the final run, end to end
# --------------------------------------------------------------------------------------------


def test_lora_space_has_the_lora_prior():
    space = load_space(str(LORA_SPACE))
    assert space.family == "lora" and space.default_schedule == "linear"
    assert (space.max_lr_prior.low, space.max_lr_prior.high) == (1e-4, 1e-3)
    assert set(space.schedules) == {"linear", "cosine", "constant"}


def test_search_and_final_run_with_lora(local_ray, tmp_path):
    job = {"name": "lora-e2e",
           "task": {"kind": "text_classification", **SMALL, "peft": PEFT},
           "range_test": {"start_lr": 1e-6, "end_lr": 1.0, "num_steps": 12},
           "space": {"family": "lora"},
           # ranked by the continuous val_loss at the rungs: 16 validation texts make accuracies tie
           "search": {"num_trials": 6, "max_epochs": 2, "grace_period": 1, "max_concurrent_trials": 2,
                      "rung_metric": "val_loss"},
           "storage": {"path": str(tmp_path / "runs")},
           "tracking": {"uri": mlflow_uri(tmp_path), "experiment": "lora-e2e"}}
    result = lrsearch.search(job)
    assert result.counts["errored"] == 0 and result.counts["total"] == 6, result.trials
    # the built-in loop on the trial protocol: every step at its schedule's LR, ASHA stopping trials
    assert_schedules(f"sqlite:///{tmp_path}/mlruns.db", result, result.steps_per_epoch)
    assert_asha_stopped_some(result)
    best = result.best
    assert best is not None and math.isfinite(best.value) and best.schedule in {"linear", "cosine", "constant"}
    # the range test on the adapters set the max_lr range the trials drew from
    low, high = lrsearch.load_job(job).search_space(tuple(result.range_test["bounds"])).max_lr_prior.model_dump(
        include={"low", "high"}).values()
    assert low <= best.max_lr <= high

    final = lrsearch.train(job, result, epochs=1)  # tracked: the model goes to MLflow
    assert final.test_metric is not None and 0.0 <= final.test_metric <= 1.0 and math.isfinite(final.test_loss)
    # the chosen config's weights on disk: the adapters and the head only
    out = Path(final.paths["final"])
    assert (out / f"{final.trial_id}.final.pt").stat().st_size < 0.02 * Path(final.paths["model"]).stat().st_size

    task = build_task(lrsearch.load_job(job))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    (tmp_path / "model").mkdir()
    logged = mlflow.pytorch.load_model(final.model_uri, dst_path=str(tmp_path / "model")).eval()
    # the pickled PeftModel needs peft to load: the logged requirements pin it
    assert "peft==" in next((tmp_path / "model").rglob("requirements.txt")).read_text()
    rebuilt = task.build_model()
    rebuilt.load_state_dict(torch.load(final.paths["model"], weights_only=True))  # model.pt: strict
    rebuilt.eval()
    hits = total = 0
    with torch.no_grad():
        for inputs, labels in task.test_loader:
            logits = logged(**inputs).logits
            assert torch.allclose(logits, rebuilt(**inputs).logits, atol=1e-5)
            hits += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    assert hits / total == pytest.approx(final.test_metric)
