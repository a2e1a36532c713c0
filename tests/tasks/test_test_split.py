"""The held-out test split of every built-in task: disjoint from train and validation for every
seed, the size asked for, and absent from nothing else (adding it leaves train and validation as
they were without it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrsearch.job.parse import parse_job
from lrsearch.tasks import build_task, synthetic_task
from lrsearch.tasks.image import fashion_indices
from lrsearch.tasks.image import split_indices as image_split
from lrsearch.tasks.text import split_indices as text_split

SEEDS = range(12)


def _disjoint(*parts) -> None:
    sets = [set(np.asarray(p).tolist()) for p in parts]
    for i, a in enumerate(sets):
        assert len(a) == len(parts[i]), "an index appears twice in one split"
        for b in sets[i + 1:]:
            assert not a & b


@pytest.mark.parametrize("seed", SEEDS)
def test_text_split_is_disjoint_and_leaves_train_and_val_as_without_it(seed):
    # 2080: the four default fortunes categories
    train, val, test = text_split(2080, 512, 256, 256, seed, "fortunes")
    assert (len(train), len(val), len(test)) == (512, 256, 256)
    _disjoint(train, val, test)
    without = text_split(2080, 512, 256, 0, seed, "fortunes")
    assert without[:2] == (train, val) and without[2] == []


def test_text_split_short_data_gives_the_test_what_is_left_with_a_warning():
    with pytest.warns(UserWarning, match="task.num_test"):
        train, val, test = text_split(900, 512, 256, 256, 0, "mine.csv")
    assert (len(train), len(val), len(test)) == (512, 256, 132)
    _disjoint(train, val, test)


@pytest.mark.parametrize("seed", SEEDS)
def test_image_split_is_disjoint_for_digits_and_folders(seed):
    rng = np.random.default_rng(seed)
    train, val, test = image_split(1797, 512, 256, 512, rng, "digits")
    assert (len(train), len(val), len(test)) == (512, 256, 512)
    _disjoint(train, val, test)
    again = image_split(1797, 512, 256, 0, np.random.default_rng(seed), "digits")
    assert torch.equal(again[0], train) and torch.equal(again[1], val) and len(again[2]) == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_fashion_mnist_test_images_are_t10k_images_the_validation_does_not_use(seed):
    train, val, test = fashion_indices(60000, 10000, 512, 256, 1500, np.random.default_rng(seed))
    assert (len(train), len(val), len(test)) == (512, 256, 1500)
    _disjoint(val, test)  # both from t10k; train comes from the train files
    assert all(0 <= i < 10000 for i in np.concatenate([val, test]))
    before = fashion_indices(60000, 10000, 512, 256, 0, np.random.default_rng(seed))
    assert np.array_equal(before[0], train) and np.array_equal(before[1], val)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_test_examples_are_new_draws(seed):
    task = synthetic_task(num_train=256, num_val=128, num_test=200, seed=seed)
    rows = {kind: torch.cat([x for x, _ in loader]) for kind, loader in
            (("train", task.train_loader), ("val", task.val_loader), ("test", task.test_loader))}
    assert len(rows["test"]) == 200
    keys = {kind: {tuple(r.tolist()) for r in x} for kind, x in rows.items()}
    assert not keys["test"] & keys["train"] and not keys["test"] & keys["val"]
    plain = synthetic_task(num_train=256, num_val=128, num_test=0, seed=seed)
    assert plain.test_loader is None
    assert torch.equal(torch.cat([x for x, _ in plain.val_loader]), rows["val"])


def test_every_built_in_task_kind_builds_its_test_loader():
    # the real builders, small: digits through EfficientNet-Lite0, fortunes through MiniLM
    jobs = {
        "image_classification": {"kind": "image_classification", "dataset": "digits", "num_train": 64,
                                 "num_val": 32, "num_test": 48, "image_size": 32, "batch_size": 16},
        "text_classification": {"kind": "text_classification", "num_train": 32, "num_val": 16,
                                "num_test": 24, "max_length": 16},
        "synthetic": {"kind": "synthetic", "num_train": 64, "num_val": 32, "num_test": 40},
    }
    for kind, task_cfg in jobs.items():
        task = build_task(parse_job({"name": "split", "task": task_cfg}))
        assert sum(len(y) for _, y in task.test_loader) == task_cfg["num_test"], kind
        assert sum(len(y) for _, y in task.val_loader) == task_cfg["num_val"], kind


def test_num_test_is_checked_like_the_other_sizes():
    from lrsearch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"task.num_test: got -1; allowed: a value >= 0"):
        parse_job({"name": "bad", "task": {"kind": "synthetic", "num_test": -1}})
