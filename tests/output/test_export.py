"""Export of a best config: horizon-free yaml/json, TrainingArguments kwargs and a torch snippet that
give, for the user's run length, the schedule lrsearch would build for that length."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import yaml

import lrsearch.optim.schedules
from lrsearch.errors import ConfigError
from lrsearch.job.space import schedule_params
from lrsearch.optim.optimizers import param_groups
from lrsearch.optim.schedules import SCHEDULES, build_scheduler
from lrsearch.output.formats import (
    FORMATS,
    hf_training_arguments,
    portable_config,
    render,
    torch_snippet,
)

MAX_LR = 3e-4
ADAMW = {"name": "adamw", "weight_decay": 0.01, "momentum": 0.9, "betas": [0.9, 0.999], "eps": 1e-8}

#: non-default, horizon-free parameters for every schedule, as a search space samples them
PARAMS = {
    "linear": {"warmup_frac": 0.2},
    "cosine": {"warmup_frac": 0.05, "min_lr_ratio": 0.1},
    "stlr": {"cut_frac": 0.2, "ratio": 16.0},
    "cosine_annealing": {"min_lr_ratio": 0.05},
    "cosine_restarts": {"T_0_frac": 0.25, "T_mult": 2, "min_lr_ratio": 0.0},
    "exponential": {"min_lr_ratio": 0.02},
    "step": {"step_size_frac": 0.3, "gamma": 0.5},
    "one_cycle": {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0},
    "constant": {"warmup_frac": 0.1},
    "schedule_free": {"warmup_frac": 0.05},
    "wsd": {"warmup_frac": 0.05, "decay_frac": 0.3, "decay_type": "cosine", "min_lr_ratio": 0.0},
}


def test_every_schedule_has_parameters_here():
    assert set(PARAMS) == set(SCHEDULES)


def _best(schedule: str, params: dict[str, Any], *, epochs: int = 2, steps_per_epoch: int = 12,
          optimizer: dict[str, Any] | None = None, layer_decay: float | None = None) -> dict[str, Any]:
    """A best config in the horizon-free schema, as best_config.yaml holds it."""
    total = epochs * steps_per_epoch
    config = {"schedule": schedule, schedule: params, "max_lr": MAX_LR}
    return {
        "schedule": schedule,
        "max_lr": MAX_LR,
        "params": params,
        "optimizer": optimizer or ADAMW,
        "layer_decay": layer_decay,
        "metric": "val_accuracy",
        "value": 0.875,
        "trial_id": "abc123_00003",
        "search_horizon": {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "total_steps": total,
                           "schedule_params": schedule_params(config, total)},
        "search_config": config,
    }


def _lrs(optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[float]:
    """The LR of every parameter group at every step, flat."""
    lrs = []
    for _ in range(steps):
        lrs.extend(float(g["lr"]) for g in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
    return lrs


def _reference(schedule: str, params: dict[str, Any], total_steps: int, model: torch.nn.Module,
               **resolved: Any) -> list[float]:
    """What lrsearch builds for a run of ``total_steps``: the search's own code path."""
    opt = torch.optim.AdamW(param_groups(model, MAX_LR, ADAMW["weight_decay"]), lr=MAX_LR)
    kwargs = resolved or schedule_params({"schedule": schedule, schedule: params}, total_steps)
    return _lrs(opt, build_scheduler(opt, schedule, total_steps, **kwargs), total_steps)


def _exec_snippet(best: dict[str, Any]) -> dict[str, Any]:
    text, note = render(best, "torch")
    assert note is None
    scope: dict[str, Any] = {}
    exec(compile(text, "best_lr.py", "exec"), scope)  # the file `export -f torch -o best_lr.py` writes
    return scope


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [True, False], ids=["given", "defaults"])
@pytest.mark.parametrize("schedule", list(PARAMS))
def test_torch_snippet_builds_the_schedule_for_the_users_run(schedule, given):
    params = PARAMS[schedule] if given else {}
    best = _best(schedule, params)
    scope = _exec_snippet(best)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    for total in (24, 1000):
        opt = scope["build_optimizer"](model)
        lrs = _lrs(opt, scope["build_lr_scheduler"](opt, total_steps=total), total)
        assert lrs == pytest.approx(_reference(schedule, params, total, model), rel=1e-12, abs=0)
    # at the search's own horizon it is the search's schedule, as logged
    opt = scope["build_optimizer"](model)
    lrs = _lrs(opt, scope["build_lr_scheduler"](opt, 24), 24)
    logged = _reference(schedule, params, 24, model, **best["search_horizon"]["schedule_params"])
    assert lrs == pytest.approx(logged, rel=1e-12, abs=0)


def test_torch_snippet_scales_fractions_with_the_run_length():
    model = torch.nn.Linear(4, 3)
    for schedule, attr, expected in [("linear", "warmup_steps", int(0.2 * 1000)),
                                     ("constant", "warmup_steps", int(0.1 * 1000)),
                                     ("cosine_restarts", "T_0", 250),
                                     ("step", "step_size", 300)]:
        scope = _exec_snippet(_best(schedule, PARAMS[schedule]))
        for total, want in ((24, None), (1000, expected)):
            opt = scope["build_optimizer"](model)
            sched = scope["build_lr_scheduler"](opt, total)
            got = sched.lr_lambdas[0].keywords[attr] if attr == "warmup_steps" else getattr(sched, attr)
            if want is not None:
                assert got == want, (schedule, total)
            else:  # the search's horizon: what the search logged in steps
                logged = _best(schedule, PARAMS[schedule])["search_horizon"]["schedule_params"]
                assert got == logged.get(attr, int(logged.get("warmup_frac", 0) * 24)), schedule


def test_torch_snippet_states_the_search_horizon_and_is_horizon_free():
    text = torch_snippet(_best("cosine_restarts", PARAMS["cosine_restarts"]))
    assert "# Searched over 24 optimizer steps (2 epochs of 12)" in text
    assert "def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int)" in text
    assert "T_0=max(1, round(0.25 * total_steps))" in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("24" in line for line in code)  # the horizon only ever appears in comments


def test_torch_snippet_optimizers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sgd = {"name": "sgd", "weight_decay": 0.001, "momentum": 0.8, "betas": [0.9, 0.999], "eps": 1e-8}
    opt = _exec_snippet(_best("linear", {}, optimizer=sgd))["build_optimizer"](model)
    assert isinstance(opt, torch.optim.SGD)
    assert {(g["lr"], g["weight_decay"], g["momentum"]) for g in opt.param_groups} == {
        (MAX_LR, 0.001, 0.8), (MAX_LR, 0.0, 0.8)}  # no weight decay on biases, as in the search
    adam = dict(ADAMW, name="adam", betas=[0.8, 0.99], eps=1e-6)
    opt = _exec_snippet(_best("linear", {}, optimizer=adam))["build_optimizer"](model)
    assert type(opt) is torch.optim.Adam
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["eps"] == 1e-6
    # layer-wise decay: the head at max_lr, each layer below 0.5 times the one above
    scope = _exec_snippet(_best("linear", {}, layer_decay=0.5))
    opt = scope["build_optimizer"](model, layer_groups=lambda m: [list(m[0].parameters()), list(m[1].parameters())])
    assert sorted({g["lr"] for g in opt.param_groups}) == [MAX_LR * 0.5, MAX_LR]


# --------------------------------------------------------------------------------------------
# hf
# --------------------------------------------------------------------------------------------

#: schedules transformers computes identically, with the parameter sets that pick each scheduler type
HF_CASES = {
    "linear": ("linear", PARAMS["linear"]),
    "linear-defaults": ("linear", {}),
    "cosine": ("cosine", {"warmup_frac": 0.05}),
    "cosine-min": ("cosine", PARAMS["cosine"]),
    "cosine-defaults": ("cosine", {}),
    "cosine_annealing": ("cosine_annealing", {}),
    "cosine_annealing-min": ("cosine_annealing", PARAMS["cosine_annealing"]),
    "constant": ("constant", PARAMS["constant"]),
    "constant-no-warmup": ("constant", {}),
    "schedule_free": ("schedule_free", PARAMS["schedule_free"]),
}


def _training_args(tmp_path, kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), report_to=[], **kwargs)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_kwargs_give_transformers_the_same_schedule_at_any_length(tmp_path, case):
    from transformers import get_scheduler

    schedule, params = HF_CASES[case]
    kwargs, note = hf_training_arguments(_best(schedule, params))
    assert "num_train_epochs" not in kwargs and "max_steps" not in kwargs
    assert "searched over 24 optimizer steps (2 epochs of 12)" in note
    args = _training_args(tmp_path, kwargs)
    assert args.learning_rate == MAX_LR and args.weight_decay == ADAMW["weight_decay"]
    model = torch.nn.Linear(4, 3)
    for total in (1000, 24):
        opt = torch.optim.AdamW(param_groups(model, args.learning_rate, args.weight_decay), lr=args.learning_rate)
        # what Trainer.create_scheduler does
        sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(total),
                              num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        hf = _lrs(opt, sched, total)
        ours = _reference(schedule, params, total, model)
        warmup = kwargs["warmup_steps"] * total
        if warmup == int(warmup):
            assert hf == pytest.approx(ours, rel=1e-9, abs=1e-15), total
        else:  # 0.1 * 24 = 2.4: transformers rounds a fractional warmup up, lrsearch down (the note says so)
            assert total == 24 and args.get_warmup_steps(total) == int(warmup) + 1


@pytest.mark.parametrize("schedule", [s for s in PARAMS if s not in {c[0] for c in HF_CASES.values()}])
def test_hf_note_passes_lrsearchs_scheduler_where_transformers_lacks_it(tmp_path, schedule):
    kwargs, note = hf_training_arguments(_best(schedule, PARAMS[schedule]))
    assert "lr_scheduler_type" not in kwargs and "warmup_steps" not in kwargs
    assert "num_train_epochs" not in kwargs
    _training_args(tmp_path, kwargs)  # every key is a TrainingArguments field
    assert f"transformers has no {schedule!r} schedule" in note
    assert "searched over 24 optimizer steps (2 epochs of 12)" in note
    call = re.search(r"`scheduler = (.+?)`", note).group(1)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(param_groups(model, MAX_LR, ADAMW["weight_decay"]), lr=MAX_LR)
    sched = eval(call, {"lrsearch": lrsearch, "optimizer": opt, "total_steps": 1000})  # the note's code
    assert _lrs(opt, sched, 1000) == pytest.approx(_reference(schedule, PARAMS[schedule], 1000, model),
                                                   rel=1e-12, abs=0)


def test_hf_export_is_not_tied_to_the_search_horizon(tmp_path):
    # before: a 24-step search exported num_train_epochs: 2 and warmup_steps: 4 (20 % of 24 steps)
    best = _best("linear", {"warmup_frac": 0.2}, epochs=2, steps_per_epoch=12)
    text, note = render(best, "hf")
    kwargs = json.loads(text)
    assert "num_train_epochs" not in kwargs
    assert kwargs["warmup_steps"] == 0.2 and kwargs["lr_scheduler_type"] == "linear"
    assert "searched over 24 optimizer steps (2 epochs of 12)" in note and "fraction" in note
    assert _training_args(tmp_path, kwargs).get_warmup_steps(1000) == 200


def test_hf_optimizers(tmp_path):
    from transformers import Trainer

    model = torch.nn.Linear(4, 3)
    sgd = {"name": "sgd", "weight_decay": 0.001, "momentum": 0.8, "betas": [0.9, 0.999], "eps": 1e-8}
    kwargs, _ = hf_training_arguments(_best("linear", {}, optimizer=sgd))
    cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(_training_args(tmp_path, kwargs), model)
    assert cls is torch.optim.SGD and opt_kwargs["momentum"] == 0.8 and opt_kwargs["lr"] == MAX_LR
    adamw = dict(ADAMW, betas=[0.8, 0.99], eps=1e-6)
    kwargs, _ = hf_training_arguments(_best("linear", {}, optimizer=adamw))
    cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(_training_args(tmp_path, kwargs), model)
    assert cls is torch.optim.AdamW and opt_kwargs["betas"] == (0.8, 0.99) and opt_kwargs["eps"] == 1e-6
    _, note = hf_training_arguments(_best("linear", {}, optimizer=dict(ADAMW, name="adam")))
    assert "L2 weight decay" in note
    _, note = hf_training_arguments(_best("linear", {}, layer_decay=0.8))
    assert "layer_decay=0.8" in note


# --------------------------------------------------------------------------------------------
# yaml / json, inputs, errors
# --------------------------------------------------------------------------------------------


def test_yaml_and_json_hold_the_portable_config():
    best = _best("cosine_restarts", PARAMS["cosine_restarts"])
    text, note = render(best, "yaml")
    assert note is None
    loaded = yaml.safe_load(text)
    assert list(loaded) == ["schedule", "max_lr", "params", "optimizer", "train", "layer_decay", "metric", "value",
                            "trial_id", "search_horizon"]
    assert loaded["params"] == {"T_0_frac": 0.25, "T_mult": 2, "min_lr_ratio": 0.0}
    assert loaded["search_horizon"] == best["search_horizon"]
    assert loaded["search_horizon"]["schedule_params"]["T_0"] == 6
    assert loaded["optimizer"] == ADAMW
    text, note = render(best, "json")
    assert note is None and json.loads(text) == loaded == portable_config(best)


def test_an_object_with_to_dict_is_a_best_config():
    @dataclass
    class BestConfig:
        data: dict[str, Any]

        def to_dict(self) -> dict[str, Any]:
            return self.data

    best = _best("step", PARAMS["step"])
    for fmt in FORMATS:
        assert render(BestConfig(best), fmt) == render(best, fmt)


def test_a_best_config_of_the_step_count_schema_exports_the_same():
    # best_config.yaml written before the horizon-free schema: schedule_params in steps of the search
    best = _best("step", PARAMS["step"])
    old = {"schedule": "step", "max_lr": MAX_LR, "schedule_params": {"step_size": 7, "gamma": 0.5},
           "optimizer": ADAMW, "layer_decay": None, "total_steps": 24, "epochs": 2, "metric": "val_accuracy",
           "value": 0.875, "trial_id": "abc123_00003", "search_config": best["search_config"]}
    assert best["search_horizon"]["schedule_params"] == old["schedule_params"]
    for fmt in FORMATS:
        assert render(old, fmt) == render(best, fmt)
    # without the trial's config, the step counts become fractions of the search's horizon
    del old["search_config"]
    assert portable_config(old)["params"] == {"step_size_frac": 7 / 24, "gamma": 0.5}
    kwargs, _ = hf_training_arguments({**old, "schedule": "cosine", "schedule_params": PARAMS["cosine"]})
    assert kwargs["warmup_steps"] == 0.05 and kwargs["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}


def test_a_bad_format_names_the_option_the_value_and_the_choices():
    with pytest.raises(ConfigError, match=r"^--format: got 'onnx'; allowed: yaml, json, hf, torch$"):
        render(_best("linear", {}), "onnx")


@pytest.mark.parametrize("change, message", [
    ({"schedule": "cyclic"}, "schedule: got 'cyclic'; allowed: linear, cosine"),
    ({"params": {"warmup_frac": 1.5}}, "warmup_frac=1.5 is out of range"),
    ({"params": {"cut_frac": 0.1}}, "has no parameter 'cut_frac'"),
    ({"schedule": "step", "params": {"step_size": 8}}, "params.step_size: a value tied to one run length.*step_size_frac"),
    ({"schedule": "exponential", "params": {"gamma": 0.9}}, "params.gamma: .*min_lr_ratio"),
    ({"optimizer": {"name": "lion"}}, "optimizer.name"),
    ({"metric": None, "value": None, "max_lr": None}, None),
])
def test_an_invalid_best_config_is_one_clear_error(change, message):
    best = _best("linear", {}) | change
    if message is None:  # missing fields
        best = {k: v for k, v in best.items() if k not in change}
        message = "missing max_lr, metric, value"
    with pytest.raises(ConfigError, match=message):
        render(best, "hf")
