"""Search spaces: shipped files, conditional sampling with real Optuna, bounds, bad spaces."""

from __future__ import annotations

import pickle

import optuna
import pytest

from lrsearch.errors import ConfigError
from lrsearch.job.space import (
    FAMILIES,
    Range,
    SpaceSampler,
    load_space,
    resolve_space,
    schedule_params,
)
from lrsearch.optim.schedules import SCHEDULES, build_scheduler

PRIORS = {"resnet": (1e-4, 1e-3), "efficientnet": (1e-4, 5e-4), "vit": (5e-6, 1e-4),
          "bert": (2e-5, 5e-5), "gpt2": (1e-5, 3e-5), "lora": (1e-4, 1e-3)}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shipped_space_loads_with_its_prior(family):
    space = load_space(family)
    assert space.family == family
    assert space.default_schedule in space.schedules
    if family in PRIORS:
        assert (space.max_lr_prior.low, space.max_lr_prior.high) == PRIORS[family]


def test_default_space_has_every_schedule():
    # but the schedule_free arm: it swaps the optimizer and adds a start point, so a space opts in
    assert set(load_space("default").schedules) == set(SCHEDULES) - {"schedule_free"}


def _sample(space, n=60, seed=0):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    sampler = SpaceSampler(space)
    trials = []
    for i in range(n):
        trial = study.ask()
        sampler(trial)
        study.tell(trial, float(i % 7))
        trials.append(trial.params)
    return trials


def test_sampling_is_conditional_on_the_schedule():
    space = load_space("default")
    trials = _sample(space)
    assert len({t["schedule"] for t in trials}) >= 6
    for params in trials:
        schedule = params["schedule"]
        own = {k.split("/", 1)[1] for k in params if "/" in k}
        assert all(k.startswith(schedule + "/") for k in params if "/" in k), params
        assert own == set(space.schedules[schedule]), params
        # every sampled config builds a real scheduler
        import torch

        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=params["max_lr"])
        config = {"max_lr": params["max_lr"], "schedule": schedule,
                  schedule: {k.split("/", 1)[1]: v for k, v in params.items() if "/" in k}}
        build_scheduler(opt, schedule, 100, **schedule_params(config, 100))


def test_bounds_feed_max_lr_and_the_job_can_widen_or_override():
    base = load_space("bert")
    space = resolve_space(base, bounds=(1e-5, 1e-3))
    assert (space.max_lr_prior.low, space.max_lr_prior.high) == (1e-5, 1e-3)
    assert all(1e-5 <= t["max_lr"] <= 1e-3 for t in _sample(space, 30))
    widened = resolve_space(base, bounds=(1e-5, 1e-3), widen=10)
    assert widened.max_lr_prior.low == pytest.approx(1e-6) and widened.max_lr_prior.high == pytest.approx(1e-2)
    fixed = resolve_space(base, bounds=(1e-5, 1e-3), max_lr=Range(low=3e-5, high=4e-5, log=True))
    assert (fixed.max_lr_prior.low, fixed.max_lr_prior.high) == (3e-5, 4e-5)
    prior = resolve_space(base, bounds=None)
    assert (prior.max_lr_prior.low, prior.max_lr_prior.high) == (2e-5, 5e-5)


def test_weight_decay_and_layer_decay_are_searched_when_asked():
    space = resolve_space(load_space("bert"), weight_decay=Range(low=1e-4, high=0.1, log=True),
                          layer_decay=Range(low=0.6, high=1.0))
    for t in _sample(space, 10):
        assert 1e-4 <= t["weight_decay"] <= 0.1 and 0.6 <= t["layer_decay"] <= 1.0


def test_fraction_parameters_become_steps():
    config = {"schedule": "cosine_restarts", "cosine_restarts": {"T_0_frac": 0.25, "T_mult": 2.0}}
    assert schedule_params(config, 400)["T_0"] == 100
    assert schedule_params(config, 400)["T_mult"] == 2
    config = {"schedule": "step", "step": {"step_size_frac": 0.5, "gamma": 0.3}}
    assert schedule_params(config, 90) == {"step_size": 45, "gamma": 0.3}


def test_first_point_is_the_default_schedule_at_the_suggestion():
    sampler = SpaceSampler(load_space("bert"))
    point = sampler.first_point(3e-5)
    assert point == {"max_lr": 3e-5, "schedule": "linear", "linear/warmup_frac": pytest.approx(0.1)}
    pickle.loads(pickle.dumps(sampler))  # Ray checkpoints the searcher with it


def _write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


HEAD = "family: mine\nmax_lr_prior: {low: 1.0e-5, high: 1.0e-3, log: true}\ndefault_schedule: linear\n"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("schedules: {}\n", "at least one schedule"),
        ("schedules: {cosin: {}}\n", "unknown schedule"),
        ("schedules: {linear: {warmup: {low: 0, high: 0.1}}}\n", "unknown parameter"),
        ("schedules: {linear: {warmup_frac: {low: 0.2, high: 0.1}}}\n", "low (0.2) must be less than high (0.1)"),
        ("schedules: {stlr: {ratio: {low: 0, high: 10, log: true}}}\n", "log range must be above 0"),
        ("schedules: {linear: {warmup_frac: {low: 0.0, high: 1.5}}}\n", "warmup_frac"),
        ("schedules: {cosine_restarts: {T_mult: []}}\n", "empty list"),
        ("schedules: {cosine: {}}\n", "default_schedule"),
    ],
)
def test_bad_spaces_are_one_clear_error(tmp_path, body, fragment):
    with pytest.raises(ConfigError) as info:
        load_space(_write(tmp_path, HEAD + body))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_restricting_to_unknown_schedule_is_an_error():
    with pytest.raises(ConfigError, match="space.schedules: got 'cosine_annealing'"):
        resolve_space(load_space("bert"), schedules=["linear", "cosine_annealing"])
