"""The language modeling task on a real (tiny) GPT-2 written offline by the causal-LM example."""

from __future__ import annotations

import importlib.util
import math
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from conftest import mlflow_uri
from protocol_checks import assert_asha_stopped_some, assert_schedules

import lrsearch
from lrsearch.errors import ConfigError, TaskError
from lrsearch.job.parse import parse_job
from lrsearch.tasks import build_task, evaluate, reseed
from lrsearch.tasks.lm import (
    IGNORE_INDEX,
    causal_lm_loss,
    decoder_layer_groups,
    language_modeling_task,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "causal_lm"
NUM_TRAIN, NUM_VAL, NUM_TEST, MAX_LENGTH, BATCH = 32, 16, 16, 32, 8


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No test may reach the hub: transformers reads only local files."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The range test and the final run train in this process: one thread, like each trial (on a
    busy machine two spinning OpenMP threads make the tiny model's steps 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """The example's own builder: a 2-block GPT-2 and a BPE tokenizer trained on fortunes."""
    spec = importlib.util.spec_from_file_location("make_tiny_gpt2", EXAMPLE / "make_tiny_gpt2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(tmp_path_factory.mktemp("lm") / "tiny-gpt2")


def small_task(model_dir: Path, **kwargs):
    params = dict(num_train=NUM_TRAIN, num_val=NUM_VAL, num_test=NUM_TEST, max_length=MAX_LENGTH,
                  batch_size=BATCH)
    return language_modeling_task(model=str(model_dir), **{**params, **kwargs})


@pytest.fixture(scope="module")
def task(tiny_gpt2):
    return small_task(tiny_gpt2)


@pytest.fixture(scope="module")
def model(task):
    return task.build_model()


def _rows(loader) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for inputs, _ in loader for row in inputs["input_ids"]]


def _hf_loss(model, batch) -> tuple[float, int]:
    """Hugging Face's own mean token loss of a batch, and how many shifted real tokens it averages."""
    inputs, labels = batch
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels)
    return float(out.loss), int((labels[:, 1:] != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def test_the_task_section_parses_with_defaults():
    job = parse_job({"name": "lm", "task": {"kind": "language_modeling", "model": "some/dir"},
                     "space": {"family": "gpt2"}})
    assert job.task.kind == "language_modeling" and job.task.metric == "loss"
    assert (job.task.dataset, job.task.categories, job.task.num_test) == ("fortunes", None, 256)
    assert job.search_space().family == "gpt2"


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("metric", "accuracy", "'loss' or 'perplexity'"),
    ("num_train", 1, "a value >= 2"),
    ("categories", [], "needs at least 1 category"),
    ("vocab", 5, "unknown field"),
])
def test_a_bad_value_names_the_field_the_value_and_what_is_allowed(tmp_path, field, value, allowed):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "lm", "task": {"kind": "language_modeling", "model": "m",
                                                           field: value}}))
    with pytest.raises(ConfigError) as err:
        lrsearch.load_job(path)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert f"task.{field}: " in message and repr(value) in message and allowed in message, message


def test_the_model_is_required():
    with pytest.raises(ConfigError, match=r"task\.model: required field is missing"):
        parse_job({"name": "lm", "task": {"kind": "language_modeling"}})


def test_the_example_job_builds_its_task_from_a_model_next_to_it(tiny_gpt2, tmp_path):
    data = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    assert (data["task"]["kind"], data["space"]["family"]) == ("language_modeling", "gpt2")
    (tmp_path / data["task"]["model"]).symlink_to(tiny_gpt2)  # relative to the job file, as shipped
    data["task"].update(num_train=8, num_val=4, num_test=0, max_length=16)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    task = build_task(lrsearch.load_job(path))
    assert task.name == "tiny-gpt2/fortunes" and (task.metric, task.mode) == ("loss", "min")
    assert len(task.train_loader.dataset) == 8 and task.test_loader is None


# --------------------------------------------------------------------------------------------
# the task: data, loss, evaluation
# --------------------------------------------------------------------------------------------


def test_loaders_hold_disjoint_texts_labelled_with_their_own_tokens(task):
    assert (task.metric, task.mode) == ("loss", "min")
    assert [len(loader.dataset) for loader in (task.train_loader, task.val_loader, task.test_loader)] == [
        NUM_TRAIN, NUM_VAL, NUM_TEST]
    inputs, labels = next(iter(task.train_loader))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == labels.shape == (BATCH, MAX_LENGTH)
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert bool((labels[mask == 0] == IGNORE_INDEX).all()) and bool((mask == 0).any())
    # right padding: the real tokens come first, and a text that fits ends with end-of-text
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())
    short = mask.sum(1) < MAX_LENGTH
    last = ids[short, mask[short].sum(1) - 1]
    eos = ids[mask == 0][0]  # padding is end-of-text
    assert bool((last == eos).all())
    train, val, test = (set(_rows(loader)) for loader in (task.train_loader, task.val_loader, task.test_loader))
    assert not (train & val) and not (train & test) and not (val & test)


def test_training_batches_are_shuffled_by_the_seed_and_reseeded(task):
    reseed(task, 7)
    first = _rows(task.train_loader)
    reseed(task, 7)
    assert _rows(task.train_loader) == first
    reseed(task, 8)
    again = _rows(task.train_loader)
    assert again != first and sorted(again) == sorted(first)
    assert _rows(task.val_loader) == _rows(task.val_loader)  # evaluation order is fixed


def test_the_criterion_is_hugging_faces_own_causal_lm_loss(task, model):
    model.eval()
    with torch.no_grad():
        for batch in list(task.train_loader)[:2]:
            inputs, labels = batch
            ours = float(causal_lm_loss(model(**inputs).logits, labels))
            assert ours == pytest.approx(_hf_loss(model, batch)[0], abs=1e-5)
    model.train()
    assert pickle.loads(pickle.dumps(task.criterion)) is causal_lm_loss


def test_evaluate_is_the_token_mean_over_the_whole_split_and_its_exp(tiny_gpt2, task, model):
    model.eval()
    with torch.no_grad():
        pairs = [_hf_loss(model, batch) for batch in task.val_loader]
    model.train()
    expected = sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)
    metrics = evaluate(model, task)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training  # evaluate restores the mode it found
    # padding counts nothing: batches hold different numbers of real tokens, so this differs from
    # the mean of the batch means
    assert len({n for _, n in pairs}) > 1
    test = evaluate(model, task, loader=task.test_loader)
    assert math.isfinite(test["loss"]) and test["loss"] != metrics["loss"]

    by_perplexity = small_task(tiny_gpt2, metric="perplexity")
    assert (by_perplexity.metric, by_perplexity.mode) == ("perplexity", "min")
    assert evaluate(model, by_perplexity) == pytest.approx(metrics)


def test_build_model_loads_the_saved_weights_fresh_each_time(tiny_gpt2, task, model):
    from safetensors.torch import load_file

    stored = load_file(str(tiny_gpt2 / "model.safetensors"))
    other = task.build_model()
    assert other is not model and other.training
    assert torch.equal(other.transformer.h[1].mlp.c_fc.weight, stored["transformer.h.1.mlp.c_fc.weight"])
    assert pickle.loads(pickle.dumps(task.build_model)).func is task.build_model.func


def test_layer_groups_go_from_embeddings_through_blocks_to_the_final_norm(model):
    groups = decoder_layer_groups(model)
    assert len(groups) == 1 + len(model.transformer.h) + 1
    ids = [id(p) for group in groups for p in group]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)} == {id(p) for p in groups[0]}
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: the head rides with the embeddings
    assert {id(p) for p in groups[1]} == {id(p) for p in model.transformer.h[0].parameters()}
    assert {id(p) for p in groups[-1]} == {id(p) for p in model.transformer.ln_f.parameters()}
    assert len(decoder_layer_groups(torch.nn.Linear(2, 2))) == 1


def test_a_text_file_without_labels_is_a_corpus(tiny_gpt2, tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(f'{{"body": "note number {i} says hello"}}\n' for i in range(12)))
    task = small_task(tiny_gpt2, dataset=str(path), text_column="body", num_train=6, num_val=4, num_test=2)
    assert task.name == "tiny-gpt2/notes"
    assert [len(loader.dataset) for loader in (task.train_loader, task.val_loader, task.test_loader)] == [6, 4, 2]
    with pytest.raises(TaskError, match=r"task\.text_column: no column 'text'"):
        small_task(tiny_gpt2, dataset=str(path))


def test_one_fortune_category_is_enough(tiny_gpt2):
    task = small_task(tiny_gpt2, categories=["food"], num_test=0)
    assert len(task.train_loader.dataset) == NUM_TRAIN and task.test_loader is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"model": "minilm-l6"}, r"task\.model: got 'minilm-l6', an encoder"),
    ({"model": "/no/such/model"}, r"task\.model: '/no/such/model'"),
    ({"metric": "accuracy"}, r"task\.metric: got 'accuracy'; allowed: 'loss', 'perplexity'"),
    ({"max_length": 512}, r"task\.max_length: got 512; .* at most 128 tokens"),
    ({"categories": ["nope"]}, r"task\.categories: unknown fortune category 'nope'"),
])
def test_bad_inputs_name_the_field_and_value(tiny_gpt2, kwargs, match):
    params = {"model": str(tiny_gpt2), **kwargs}
    with pytest.raises((TaskError, ConfigError), match=match):
        language_modeling_task(**{"num_train": 8, "num_val": 4, "num_test": 0, "max_length": 16, **params})


# --------------------------------------------------------------------------------------------
# end to end: range test, trials, final run
# --------------------------------------------------------------------------------------------


def test_search_then_final_run_on_the_tiny_gpt2(local_ray, tiny_gpt2, tmp_path):
    job = {"name": "lm-e2e",
           "task": {"kind": "language_modeling", "model": str(tiny_gpt2), "categories": ["computers", "science"],
                    "num_train": 64, "num_val": 32, "num_test": 32, "max_length": 32, "batch_size": 16},
           "space": {"family": "gpt2"},
           "range_test": {"num_steps": 12, "end_lr": 1.0},
           "search": {"num_trials": 4, "max_epochs": 2, "grace_period": 1, "max_concurrent_trials": 2},
           "storage": {"path": str(tmp_path / "runs")},
           "tracking": {"uri": mlflow_uri(tmp_path), "experiment": "lm-e2e"},
           "resources": {"cpu": 1, "gpu": 0}}
    result = lrsearch.search(job)
    assert (result.metric, result.mode) == ("val_loss", "min")
    # the built-in loop on the trial protocol: every step at its schedule's LR, ASHA stopping trials
    assert_schedules(f"sqlite:///{tmp_path}/mlruns.db", result, result.steps_per_epoch)
    assert_asha_stopped_some(result)
    assert result.counts["errored"] == 0 and result.counts["completed"] >= 1, result.trials
    assert result.range_test is not None
    best = result.best
    assert best is not None and best.metric == "val_loss" and best.max_lr > 0
    assert best.schedule in {"cosine", "linear", "cosine_restarts", "constant"}  # search_spaces/gpt2.yaml
    assert math.isfinite(best.value) and 0 < best.value < 1e9
    assert all(math.isfinite(v) for t in result.trials for v in t.metric_per_epoch)
    # the reported metric is the validation loss itself
    assert all(t.metric_per_epoch == t.val_loss_per_epoch for t in result.trials if t.val_loss_per_epoch)

    final = lrsearch.train(job, result, epochs=1, track=False)
    assert final.metric == "loss" and final.mode == "min"
    assert math.isfinite(final.test_metric) and math.isfinite(final.val_metric)
