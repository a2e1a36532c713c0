"""Schedules: equal to torch/transformers references where they exist, defining points elsewhere."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from torch.optim import lr_scheduler as tls
from transformers import optimization as hf

from lrsearch.optim.schedules import SCHEDULES, build_scheduler, lr_curve, resolve_params

TOTAL = 1000
MAX_LR = 3e-4
REQUIRED = {"linear", "cosine", "stlr", "cosine_annealing", "cosine_restarts", "exponential",
            "step", "one_cycle", "constant"}


def _optimizer(lr: float = MAX_LR, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr / (2**i)} for i in range(groups)]
    return torch.optim.AdamW(params, lr=lr)


def _run(optimizer: torch.optim.Optimizer, scheduler, steps: int = TOTAL) -> list[list[float]]:
    history = []
    for _ in range(steps):
        history.append([float(g["lr"]) for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return history


def _assert_close(ours: list[list[float]], ref: list[list[float]]) -> None:
    assert len(ours) == len(ref)
    for step, (a_row, b_row) in enumerate(zip(ours, ref, strict=True)):
        for a, b in zip(a_row, b_row, strict=True):
            # 1e-9 relative; values that are exactly 0 in the reference must be (almost) 0 here too
            assert a == pytest.approx(b, rel=1e-9, abs=1e-18), f"step {step}: {a} != {b}"


REFERENCES = {
    "linear": (dict(warmup_frac=0.1),
               lambda o: hf.get_linear_schedule_with_warmup(o, 100, TOTAL)),
    "cosine": (dict(warmup_frac=0.06),
               lambda o: hf.get_cosine_schedule_with_warmup(o, 60, TOTAL)),
    "cosine_min_lr": (dict(warmup_frac=0.05, min_lr_ratio=0.1),
                      lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, 50, TOTAL, min_lr_rate=0.1)),
    "constant": (dict(warmup_frac=0.08),
                 lambda o: hf.get_constant_schedule_with_warmup(o, 80)),
    "cosine_annealing": (dict(), lambda o: tls.CosineAnnealingLR(o, T_max=TOTAL)),
    "cosine_annealing_floor": (dict(min_lr_ratio=0.05),
                               lambda o: tls.CosineAnnealingLR(o, T_max=TOTAL, eta_min=0.05 * MAX_LR)),
    "cosine_restarts": (dict(T_0=100, T_mult=2),
                        lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=100, T_mult=2)),
    "exponential": (dict(gamma=0.995), lambda o: tls.ExponentialLR(o, gamma=0.995)),
    "step": (dict(step_size=250, gamma=0.5), lambda o: tls.StepLR(o, step_size=250, gamma=0.5)),
    "one_cycle": (dict(pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
                  lambda o: tls.OneCycleLR(o, max_lr=MAX_LR, total_steps=TOTAL, pct_start=0.25,
                                           div_factor=10.0, final_div_factor=100.0,
                                           cycle_momentum=False)),
}


def test_registry_names_every_schedule_of_the_mission():
    assert REQUIRED <= set(SCHEDULES)


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_equals_reference_over_1000_steps(case):
    params, make_ref = REFERENCES[case]
    name = case.replace("_min_lr", "").replace("_floor", "")
    opt = _optimizer()
    ours = _run(opt, build_scheduler(opt, name, TOTAL, **params))
    ref_opt = _optimizer()
    ref = _run(ref_opt, make_ref(ref_opt))
    _assert_close(ours, ref)


def test_one_cycle_defaults_equal_torch_defaults():
    opt = _optimizer()
    ours = _run(opt, build_scheduler(opt, "one_cycle", TOTAL))
    ref_opt = _optimizer()
    ref = _run(ref_opt, tls.OneCycleLR(ref_opt, max_lr=MAX_LR, total_steps=TOTAL, cycle_momentum=False))
    _assert_close(ours, ref)


def test_lambda_schedules_equal_reference_per_group():
    # Each parameter group peaks at its own lr (discriminative fine-tuning).
    opt = _optimizer(groups=3)
    ours = _run(opt, build_scheduler(opt, "linear", TOTAL, warmup_frac=0.1))
    ref_opt = _optimizer(groups=3)
    _assert_close(ours, _run(ref_opt, hf.get_linear_schedule_with_warmup(ref_opt, 100, TOTAL)))
    assert max(row[2] for row in ours) == pytest.approx(MAX_LR / 4)


def test_stlr_defining_points():
    lrs = lr_curve("stlr", TOTAL, MAX_LR)  # cut_frac=0.1, ratio=32
    cut = 100
    assert lrs[0] == pytest.approx(MAX_LR / 32)
    assert lrs[cut] == pytest.approx(MAX_LR)
    assert max(lrs) == pytest.approx(MAX_LR) and lrs.index(max(lrs)) == cut
    assert all(a < b for a, b in zip(lrs[:cut], lrs[1 : cut + 1], strict=True))  # rises
    assert all(a > b for a, b in zip(lrs[cut:-1], lrs[cut + 1 :], strict=True))  # falls
    # one step before the end, 1/900 of the way above the floor
    assert lrs[-1] == pytest.approx(MAX_LR * (1 + (1 / 900) * 31) / 32)


def test_warmup_peaks_at_end_of_warmup():
    for name in ("linear", "cosine", "constant"):
        lrs = lr_curve(name, TOTAL, MAX_LR, warmup_frac=0.07)
        assert lrs[0] == 0.0
        assert lrs[70] == pytest.approx(MAX_LR), name
        assert lrs[69] == pytest.approx(MAX_LR * 69 / 70), name


def test_cosine_ends_at_min_lr_ratio_and_linear_at_zero():
    lrs = lr_curve("cosine", 101, 1.0, warmup_frac=0.0, min_lr_ratio=0.2)
    assert lrs[0] == 1.0
    assert lrs[-1] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 100 / 101)))
    opt = _optimizer(1.0)
    sched = build_scheduler(opt, "cosine", 100, warmup_frac=0.0, min_lr_ratio=0.2)
    _run(opt, sched, 100)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # at step == total_steps: the floor
    opt = _optimizer(1.0)
    _run(opt, build_scheduler(opt, "linear", 100), 100)
    assert opt.param_groups[0]["lr"] == 0.0


def test_constant_without_warmup_is_flat():
    assert lr_curve("constant", 50, 0.5) == [0.5] * 50


def test_restart_defaults_restart_at_quarter_then_three_quarters():
    lrs = lr_curve("cosine_restarts", TOTAL, 1.0)  # T_0 = 250, T_mult = 2
    restarts = [i for i in range(1, TOTAL) if lrs[i] > lrs[i - 1]]
    assert restarts == [250, 750]
    assert lrs[250] == lrs[750] == 1.0


def test_exponential_default_reaches_one_percent_at_the_end():
    lrs = lr_curve("exponential", TOTAL, 1.0)
    opt = _optimizer(1.0)
    _run(opt, build_scheduler(opt, "exponential", TOTAL), TOTAL)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-9)
    assert lrs[500] == pytest.approx(0.1, rel=1e-9)
    p = resolve_params("exponential", 100, min_lr_ratio=0.1)
    assert p["gamma"] == pytest.approx(0.1 ** (1 / 100))


def test_step_default_decays_twice():
    lrs = lr_curve("step", 1000, 1.0)
    assert sorted(set(lrs), reverse=True) == pytest.approx([1.0, 0.1, 0.01])
    assert lrs[333] == 1.0 and lrs[334] == pytest.approx(0.1) and lrs[668] == pytest.approx(0.01)


def test_one_cycle_defining_points():
    lrs = lr_curve("one_cycle", TOTAL, 1.0)
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(1 / 25)
    assert max(lrs) == pytest.approx(1.0)
    assert abs(peak - 0.3 * TOTAL) <= 1
    assert lrs[-1] == pytest.approx(1 / 25 / 1e4, rel=1e-6)


def test_optimizer_lr_is_the_peak_even_after_an_earlier_scheduler():
    opt = _optimizer(1.0)
    build_scheduler(opt, "constant", 10)
    for g in opt.param_groups:
        g["lr"] = 0.5
    build_scheduler(opt, "cosine_annealing", 10)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_pickle_and_state_dict_round_trip(name):
    opt = _optimizer()
    sched = build_scheduler(opt, name, 200)
    full = _run(opt, sched, 200)

    opt = _optimizer()
    sched = build_scheduler(opt, name, 200)
    _run(opt, sched, 80)
    # pickled (as Ray ships it) ...
    clone = pickle.loads(pickle.dumps(sched))
    assert clone.last_epoch == sched.last_epoch
    # ... and resumed from state_dicts on a fresh optimizer (as a resumed trial does)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    opt2 = _optimizer()
    sched2 = build_scheduler(opt2, name, 200)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    rest = _run(opt2, sched2, 120)
    _assert_close(rest, full[80:])


@pytest.mark.parametrize(
    ("name", "params", "total", "fragments"),
    [
        ("cosin", {}, 10, ["unknown schedule 'cosin'", "linear", "one_cycle"]),
        ("linear", {"warmup": 0.1}, 10, ["'linear'", "no parameter 'warmup'", "warmup_frac"]),
        ("linear", {"warmup_frac": -0.1}, 10, ["warmup_frac=-0.1", "0 <= warmup_frac < 1"]),
        ("cosine", {"warmup_frac": 1.0}, 10, ["warmup_frac=1.0", "warmup_frac < 1"]),
        ("one_cycle", {"pct_start": 1.0}, 10, ["pct_start=1.0", "0 < pct_start < 1"]),
        ("one_cycle", {"pct_start": 0}, 10, ["pct_start=0"]),
        ("linear", {}, 0, ["total_steps=0", "integer >= 1"]),
        ("step", {"step_size": 2.5}, 10, ["step_size=2.5", "integer"]),
        ("exponential", {"gamma": 0.9, "min_lr_ratio": 0.1}, 10, ["gamma or min_lr_ratio"]),
        ("stlr", {"ratio": "big"}, 10, ["ratio='big'"]),
        ("cosine_restarts", {"T_0": 0}, 10, ["T_0=0", ">= 1"]),
        ("step", {"gamma": float("nan")}, 10, ["gamma=nan"]),
        ("wsd", {"decay_type": "sqrt"}, 10, ["decay_type='sqrt'", "'linear', 'cosine', '1-sqrt'"]),
        ("wsd", {"decay_frac": 0.0}, 10, ["decay_frac=0.0", "0 < decay_frac <= 1"]),
        ("wsd", {"warmup_frac": 0.5, "decay_frac": 0.6}, 10, ["warmup_frac=0.5", "decay_frac=0.6", "over 1"]),
    ],
)
def test_bad_input_names_field_value_and_allowed(name, params, total, fragments):
    with pytest.raises(ValueError) as info:
        build_scheduler(_optimizer(), name, total, **params)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_min_lr_floor_with_different_group_peaks_is_refused_for_torch_cosines():
    with pytest.raises(ValueError, match="one peak LR"):
        build_scheduler(_optimizer(groups=2), "cosine_annealing", 10, min_lr_ratio=0.1)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_resolved_params_rebuild_the_same_curve(name):
    # What resolve_params returns (what results and exports record) must build the same schedule.
    resolved = resolve_params(name, 300)
    assert lr_curve(name, 300, 1e-3, **resolved) == lr_curve(name, 300, 1e-3)


def _hf_wsd(total: int, warmup: int, decay: int, decay_type: str, min_lr_ratio: float) -> list[float]:
    opt = _optimizer()
    sched = hf.get_wsd_schedule(opt, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=total,
                                decay_type=decay_type, min_lr_ratio=min_lr_ratio)
    return [row[0] for row in _run(opt, sched, total)]


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize(("total", "warmup_frac", "decay_frac", "min_lr_ratio"),
                         [(1000, 0.1, 0.2, 0.0), (997, 0.0, 0.5, 0.1), (37, 0.3, 0.7, 0.0), (5, 0.2, 1e-9, 0.0)])
def test_wsd_equals_transformers_get_wsd_schedule(decay_type, total, warmup_frac, decay_frac, min_lr_ratio):
    ours = lr_curve("wsd", total, MAX_LR, warmup_frac=warmup_frac, decay_frac=decay_frac,
                    decay_type=decay_type, min_lr_ratio=min_lr_ratio)
    ref = _hf_wsd(total, int(warmup_frac * total), int(decay_frac * total), decay_type, min_lr_ratio)
    assert len(ours) == len(ref) == total
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) <= 1e-9 * MAX_LR


def test_wsd_is_flat_between_warmup_and_cooldown_and_cools_down_to_the_floor():
    lrs = lr_curve("wsd", 100, 1.0, warmup_frac=0.1, decay_frac=0.2, decay_type="linear", min_lr_ratio=0.0)
    assert lrs[5] == pytest.approx(0.5) and lrs[10:80] == [1.0] * 70
    assert lrs[90] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.05)
    # defaults: 10 % warmup, a 1-sqrt cooldown over the last 20 %
    default = lr_curve("wsd", 100, 1.0)
    assert default[50] == 1.0 and default[85] == pytest.approx(1 - math.sqrt(5 / 20))
