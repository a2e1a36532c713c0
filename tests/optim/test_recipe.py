"""The training recipe (the job's `train` section): clipping, precision and accumulation, in the
steps of the trials, the range test and the final run, and in every export format."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lrsearch.engine import train_epoch
from lrsearch.engine.trial import loader_steps, steps_per_epoch
from lrsearch.errors import ConfigError
from lrsearch.job.parse import parse_job
from lrsearch.optim.divergence import DivergenceMonitor
from lrsearch.optim.recipe import Recipe, Stepper
from lrsearch.optim.schedules import build_scheduler
from lrsearch.output.formats import hf_training_arguments, render
from lrsearch.tasks import synthetic_task

CPU = torch.device("cpu")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 8, generator=g) * 50, torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


# --------------------------------------------------------------------------------------------
# the job's train section
# --------------------------------------------------------------------------------------------


def test_defaults_are_the_hf_trainers():
    job = parse_job({"name": "r", "task": {"kind": "synthetic"}})
    assert Recipe.of(job.train) == Recipe(max_grad_norm=1.0, precision="fp32", accumulation_steps=1)
    assert job.accumulation_steps() == 1


def test_fp16_without_a_gpu_is_one_line_before_anything_starts():
    with pytest.raises(ConfigError) as err:
        parse_job({"name": "r", "task": {"kind": "synthetic"}, "train": {"precision": "fp16"}})
    assert str(err.value) == ("job: train.precision: got 'fp16'; fp16 needs a CUDA GPU per trial "
                              "(resources.gpu > 0); on the CPU use bf16 or fp32")
    # with a GPU per trial it is allowed
    parse_job({"name": "r", "task": {"kind": "synthetic"}, "train": {"precision": "fp16"},
               "resources": {"gpu": 1}})


@pytest.mark.parametrize("train, fragment", [
    ({"max_grad_norm": 0}, "train.max_grad_norm: got 0; allowed: a value > 0"),
    ({"precision": "fp8"}, "train.precision: got 'fp8'"),
    ({"gradient_accumulation_steps": 0}, "train.gradient_accumulation_steps: got 0; allowed: a value >= 1"),
    ({"clip": 1.0}, "train.clip: unknown field"),
])
def test_bad_train_values_name_the_field(train, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_job({"name": "r", "task": {"kind": "synthetic"}, "train": train})


def test_accumulation_divides_the_epochs_optimizer_steps():
    task = synthetic_task(num_train=256, num_val=32, batch_size=16)  # 16 batches
    job = parse_job({"name": "r", "task": {"kind": "synthetic"}, "train": {"gradient_accumulation_steps": 3}})
    accumulate = job.train.gradient_accumulation_steps
    assert loader_steps(task, accumulate) == 5 and steps_per_epoch(task, accumulate) == 5
    big = parse_job({"name": "r", "task": {"kind": "synthetic"}, "train": {"gradient_accumulation_steps": 17}})
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps: got 17; the train loader has 16 "
                                          "batches per epoch, so at most 16 is allowed"):
        loader_steps(task, big.train.gradient_accumulation_steps)


# --------------------------------------------------------------------------------------------
# Stepper: what one optimizer step does
# --------------------------------------------------------------------------------------------


def test_clipping_bounds_the_update_to_max_grad_norm():
    batches = _batches(1, 32)
    plain, clipped = _model(), _model()
    for model, norm in ((plain, None), (clipped, 0.5)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        stepper = Stepper(Recipe(max_grad_norm=norm), model, optimizer, nn.functional.cross_entropy, CPU)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        stepper.backward(batches)
        raw = _grads(model).norm().item()
        got = stepper.step()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        if norm is None:
            assert got is None and (after - before).norm().item() == pytest.approx(raw, rel=1e-5)
        else:
            assert got == pytest.approx(raw, rel=1e-5) and raw > norm  # it really had to clip
            assert (after - before).norm().item() == pytest.approx(norm, rel=1e-4)


def test_accumulated_steps_equal_one_big_batch():
    small, big = _model(), _model()
    batches = _batches(4, 8)
    whole = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    s_small = Stepper(Recipe(None, "fp32", 4), small, torch.optim.SGD(small.parameters(), lr=0.1),
                      nn.functional.cross_entropy, CPU)
    s_big = Stepper(Recipe(None), big, torch.optim.SGD(big.parameters(), lr=0.1),
                    nn.functional.cross_entropy, CPU)
    loss_small = s_small.backward(batches)
    loss_big = s_big.backward([whole])
    assert loss_small == pytest.approx(loss_big, rel=1e-5)
    assert torch.allclose(_grads(small), _grads(big), rtol=1e-4, atol=1e-6)
    groups = list(Stepper(Recipe(None, "fp32", 4), small, None, None, CPU).batches(_batches(10, 2)))
    assert [len(g) for g in groups] == [4, 4]  # the last 2 batches make no partial step


def test_bf16_runs_the_forward_in_bfloat16_on_the_cpu():
    model = _model()
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    stepper = Stepper(Recipe(1.0, "bf16"), model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                      nn.functional.cross_entropy, CPU)
    loss = stepper.backward(_batches(1, 16))
    stepper.step()
    assert seen == [torch.bfloat16] and math.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_a_trial_epoch_takes_one_optimizer_step_per_accumulated_group():
    task = synthetic_task(num_train=256, num_val=32, batch_size=16)  # 16 batches -> 4 steps of 4
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = build_scheduler(optimizer, "linear", 8, warmup_frac=0.0)
    stepper = Stepper(Recipe(1.0, "fp32", 4), model, optimizer, task.criterion, CPU)
    _, steps, diverged, lrs = train_epoch(stepper, scheduler, task, DivergenceMonitor(), 100)
    assert (steps, diverged) == (4, False)
    assert lrs == pytest.approx([1e-3, 1e-3 * 7 / 8, 1e-3 * 6 / 8, 1e-3 * 5 / 8])
    assert scheduler.last_epoch == 4


# --------------------------------------------------------------------------------------------
# the range test and the exports carry it
# --------------------------------------------------------------------------------------------


def test_the_range_test_runs_with_the_jobs_recipe():
    from lrsearch.range_test.finder import find_lr

    job = parse_job({"name": "r", "task": {"kind": "synthetic", "num_train": 256, "batch_size": 16},
                     "range_test": {"num_steps": 10},
                     "train": {"max_grad_norm": 0.25, "precision": "bf16", "gradient_accumulation_steps": 2}})
    _, result = find_lr(job)
    s = result.settings
    assert (s["max_grad_norm"], s["precision"], s["accumulation_steps"]) == (0.25, "bf16", 2)
    assert len(result.lrs) == 10
    own = parse_job({"name": "r", "task": {"kind": "synthetic"}, "range_test": {"accumulation_steps": 3},
                     "train": {"gradient_accumulation_steps": 2}})
    assert own.accumulation_steps() == 3  # the range test's own setting wins


def _best(train: dict | None) -> dict:
    best = {"schedule": "cosine", "max_lr": 3e-4, "params": {"warmup_frac": 0.1, "min_lr_ratio": 0.0},
            "optimizer": {"name": "adamw", "weight_decay": 0.01}, "metric": "val_accuracy",
            "value": 0.9, "trial_id": "t1"}
    if train is not None:
        best["train"] = train
    return best


def test_hf_export_maps_the_recipe_to_training_arguments(tmp_path):
    from transformers import TrainingArguments

    kwargs, _ = hf_training_arguments(_best({"max_grad_norm": 0.5, "precision": "bf16",
                                             "gradient_accumulation_steps": 4}))
    assert (kwargs["max_grad_norm"], kwargs["bf16"], kwargs["fp16"], kwargs["gradient_accumulation_steps"]) \
        == (0.5, True, False, 4)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    assert (args.max_grad_norm, args.bf16, args.gradient_accumulation_steps) == (0.5, True, 4)
    # no clipping searched: 0 turns the Trainer's default clipping at 1.0 off
    none, _ = hf_training_arguments(_best({"max_grad_norm": None, "precision": "fp32",
                                           "gradient_accumulation_steps": 1}))
    assert none["max_grad_norm"] == 0.0
    # a best config from before the recipe existed was searched without clipping
    old, _ = hf_training_arguments(_best(None))
    assert old["max_grad_norm"] == 0.0 and old["gradient_accumulation_steps"] == 1


def test_yaml_export_holds_the_recipe():
    import yaml

    text, _ = render(_best({"max_grad_norm": 1.0, "precision": "fp32", "gradient_accumulation_steps": 2}), "yaml")
    assert yaml.safe_load(text)["train"] == {"max_grad_norm": 1.0, "precision": "fp32",
                                             "gradient_accumulation_steps": 2}


def test_torch_snippet_clips_as_the_search_did():
    best = _best({"max_grad_norm": 0.5, "precision": "fp32", "gradient_accumulation_steps": 1})
    best["params"]["warmup_frac"] = 0.0  # the first step at max_lr: its update shows the clipping
    text, _ = render(best, "torch")
    namespace: dict = {}
    exec(compile(text, "best_lr.py", "exec"), namespace)
    assert namespace["MAX_GRAD_NORM"] == 0.5
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = namespace["build_lr_scheduler"](optimizer, 100)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    nn.functional.cross_entropy(model(_batches(1, 32)[0][0]), _batches(1, 32)[0][1]).backward()
    assert _grads(model).norm().item() > 0.5
    lr = optimizer.param_groups[0]["lr"]
    assert lr == 1.0  # the optimizer's LR is the peak; no warmup: the first step is at it
    namespace["optimizer_step"](model, optimizer, scheduler)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.5 * lr, rel=1e-4)
    assert scheduler.last_epoch == 1 and all(p.grad is None for p in model.parameters())
