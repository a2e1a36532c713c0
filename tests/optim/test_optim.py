"""Optimizers: layer-wise LR decay groups, weight decay placement, the three optimizers, schedules on top."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrsearch.job.config import OptimizerConfig
from lrsearch.optim.optimizers import build_optimizer, param_groups
from lrsearch.optim.schedules import SCHEDULES, build_scheduler
from lrsearch.tasks.image import layer_groups

MAX_LR = 1e-3
DECAY = 0.5
WD = 0.05
# image.layer_groups splits _model() into its three blocks and the head, input first
LAYERS = 4


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)),
        nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
        nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
        nn.Linear(8, 3),
    )


def _layer_of(model: nn.Sequential) -> dict[int, int]:
    """id(param) -> index of the top-level child holding it (0 = input side, 3 = head)."""
    return {id(p): i for i, child in enumerate(model) for p in child.parameters()}


def _settings(groups: list[dict]) -> dict[int, tuple[float, float]]:
    """id(param) -> (lr, weight_decay); fails on a parameter listed twice or an empty group."""
    out: dict[int, tuple[float, float]] = {}
    for group in groups:
        assert group["params"], "empty parameter group"
        for p in group["params"]:
            assert id(p) not in out, "parameter in two groups"
            out[id(p)] = (group["lr"], group["weight_decay"])
    return out


def _structure(groups: list[dict]) -> list[tuple[list[int], float, float]]:
    return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups]


# --------------------------------------------------------------------------------------------
# param_groups
# --------------------------------------------------------------------------------------------


def test_layer_groups_splits_the_test_model_into_blocks_and_head():
    model = _model()
    layer = _layer_of(model)
    assert [sorted({layer[id(p)] for p in g}) for g in layer_groups(model)] == [[0], [1], [2], [3]]


def test_each_layer_gets_max_lr_times_decay_to_the_power_of_its_depth_from_the_head():
    model = _model()
    settings = _settings(param_groups(model, MAX_LR, WD, layer_groups=layer_groups, layer_decay=DECAY))
    layer = _layer_of(model)
    for p in model.parameters():
        depth = LAYERS - 1 - layer[id(p)]
        assert settings[id(p)][0] == pytest.approx(MAX_LR * DECAY**depth, rel=1e-12)
    head_lrs = {settings[id(p)][0] for p in model[-1].parameters()}
    assert head_lrs == {MAX_LR}
    assert len({lr for lr, _ in settings.values()}) == LAYERS


@pytest.mark.parametrize("decay", [1.0, DECAY, 0.9])
@pytest.mark.parametrize("with_groups", [True, False])
def test_every_trainable_parameter_is_in_exactly_one_group(decay, with_groups):
    model = _model()
    groups = param_groups(
        model, MAX_LR, WD, layer_groups=layer_groups if with_groups else None, layer_decay=decay
    )
    settings = _settings(groups)  # asserts no duplicates and no empty group
    assert set(settings) == {id(p) for p in model.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_weight_decay_on_weight_matrices_only_not_on_biases_or_norm_weights():
    model = _model()
    settings = _settings(param_groups(model, MAX_LR, WD, layer_groups=layer_groups, layer_decay=DECAY))
    named = dict(model.named_parameters())
    decayed = {n for n, p in named.items() if settings[id(p)][1] == WD}
    undecayed = {n for n, p in named.items() if settings[id(p)][1] == 0.0}
    assert decayed == {"0.0.weight", "1.0.weight", "2.0.weight", "3.weight"}
    assert undecayed == set(named) - decayed
    assert {"3.bias", "0.1.weight", "0.1.bias"} <= undecayed  # head bias, LayerNorm scale and shift


def test_conv_and_embedding_weights_decay_batchnorm_and_biases_do_not():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    emb = nn.Embedding(5, 2)
    model.add_module("emb", emb)
    settings = _settings(param_groups(model, MAX_LR, WD))
    wd = {n: settings[id(p)][1] for n, p in model.named_parameters()}
    assert wd == {
        "0.weight": WD, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0,
        "3.weight": WD, "3.bias": 0.0, "emb.weight": WD,
    }


def test_a_scalar_parameter_is_kept_and_not_decayed():
    model = nn.Sequential(nn.Linear(2, 2))
    model.register_parameter("temperature", nn.Parameter(torch.tensor(1.0)))
    settings = _settings(param_groups(model, MAX_LR, WD))
    assert settings[id(model.temperature)] == (MAX_LR, 0.0)
    assert settings[id(model[0].weight)] == (MAX_LR, WD)


def test_lr_and_weight_decay_are_set_per_layer_and_per_kind_together():
    model = _model()
    settings = _settings(param_groups(model, MAX_LR, WD, layer_groups=layer_groups, layer_decay=DECAY))
    # the bottom block's matrix: smallest LR and decayed; its LayerNorm: same LR, not decayed
    assert settings[id(model[0][0].weight)] == pytest.approx((MAX_LR * DECAY**3, WD))
    assert settings[id(model[0][1].weight)] == pytest.approx((MAX_LR * DECAY**3, 0.0))
    assert settings[id(model[3].bias)] == (MAX_LR, 0.0)


def test_frozen_parameters_are_left_out_and_other_layers_keep_their_depth():
    model = _model()
    full = _settings(param_groups(model, MAX_LR, WD, layer_groups=layer_groups, layer_decay=DECAY))
    for p in model[1].parameters():  # a whole middle block
        p.requires_grad_(False)
    model[2][0].bias.requires_grad_(False)  # and one bias elsewhere
    groups = param_groups(model, MAX_LR, WD, layer_groups=layer_groups, layer_decay=DECAY)
    settings = _settings(groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(settings) == trainable
    assert id(model[2][0].bias) not in settings
    assert not any(id(p) in settings for p in model[1].parameters())
    # depth counts from the head through the frozen block: block 0 keeps MAX_LR * DECAY**3
    assert settings == {k: v for k, v in full.items() if k in trainable}
    assert settings[id(model[0][0].weight)][0] == pytest.approx(MAX_LR * DECAY**3)


def test_frozen_parameters_are_left_out_without_layer_decay():
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    settings = _settings(param_groups(model, MAX_LR, WD))
    assert set(settings) == {id(p) for p in model[1:].parameters()}


def test_layer_decay_one_gives_the_plain_groups():
    model = _model()
    plain = param_groups(model, MAX_LR, WD)
    with_layers = param_groups(model, MAX_LR, WD, layer_groups=layer_groups, layer_decay=1.0)
    assert _structure(with_layers) == _structure(plain)
    assert {g["lr"] for g in plain} == {MAX_LR}
    assert {g["weight_decay"] for g in plain} == {WD, 0.0}


def test_layer_decay_without_layer_groups_gives_every_parameter_max_lr():
    model = _model()
    settings = _settings(param_groups(model, MAX_LR, WD, layer_decay=DECAY))
    assert {lr for lr, _ in settings.values()} == {MAX_LR}


# --------------------------------------------------------------------------------------------
# build_optimizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)],
)
def test_build_optimizer_carries_the_config_and_the_layer_lrs(name, cls):
    cfg = OptimizerConfig(name=name, weight_decay=WD, betas=(0.8, 0.95), eps=1e-6, momentum=0.7)
    model = _model()
    opt = build_optimizer(cfg, model, MAX_LR, layer_groups=layer_groups, layer_decay=DECAY)
    assert type(opt) is cls
    for group in opt.param_groups:
        if name == "sgd":
            assert group["momentum"] == 0.7
        else:
            assert group["betas"] == (0.8, 0.95)
            assert group["eps"] == 1e-6
    # the per-group LRs survive construction (not overwritten by the optimizer's default lr)
    settings = _settings(opt.param_groups)
    assert settings[id(model[3].weight)] == (MAX_LR, WD)
    assert settings[id(model[0][0].weight)] == pytest.approx((MAX_LR * DECAY**3, WD))
    assert settings[id(model[0][0].bias)] == pytest.approx((MAX_LR * DECAY**3, 0.0))
    assert set(settings) == {id(p) for p in model.parameters()}


def test_build_optimizer_defaults_to_adamw_with_the_config_defaults():
    opt = build_optimizer(OptimizerConfig(), _model(), MAX_LR)
    assert type(opt) is torch.optim.AdamW
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}
    assert {g["betas"] for g in opt.param_groups} == {(0.9, 0.999)}


@pytest.mark.parametrize(("override", "expected"), [(None, 0.1), (0.0, 0.0), (0.3, 0.3)])
def test_weight_decay_argument_overrides_the_config(override, expected):
    model = _model()
    opt = build_optimizer(OptimizerConfig(weight_decay=0.1), model, MAX_LR, weight_decay=override)
    settings = _settings(opt.param_groups)
    assert settings[id(model[3].weight)][1] == expected
    assert settings[id(model[3].bias)][1] == 0.0


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_step_decays_matrices_at_their_layer_lr_and_leaves_biases_and_norms(name):
    # zero gradients isolate weight decay: p <- p * (1 - lr * wd) for AdamW and for SGD's first step
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(
        OptimizerConfig(name=name, weight_decay=WD), model, MAX_LR,
        layer_groups=layer_groups, layer_decay=DECAY,
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        depth = LAYERS - 1 - int(n.split(".")[0])
        if p.ndim > 1:
            factor = 1 - MAX_LR * DECAY**depth * WD
            torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0)
            assert not torch.equal(p.detach(), before[n])
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_first_adam_step_moves_each_layer_by_its_lr():
    # Adam's first update is lr * g / (|g| + eps): each element moves by about its group's lr
    model = _model().double()  # float64, so rounding of p + step stays far below the tolerance
    opt = build_optimizer(
        OptimizerConfig(name="adam", eps=1e-12), model, MAX_LR,
        weight_decay=0.0, layer_groups=layer_groups, layer_decay=DECAY,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        depth = LAYERS - 1 - int(n.split(".")[0])
        step = (p.detach() - before[n]).abs().max().item()
        assert step == pytest.approx(MAX_LR * DECAY**depth, rel=1e-4), n


def test_frozen_parameters_do_not_move_and_trainable_ones_do():
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = build_optimizer(OptimizerConfig(), model, MAX_LR, layer_groups=layer_groups, layer_decay=DECAY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) == n.startswith("0."), n


# --------------------------------------------------------------------------------------------
# with a schedule
# --------------------------------------------------------------------------------------------


def _peaks_and_history(name: str, total: int, **params) -> tuple[list[float], list[list[float]]]:
    opt = build_optimizer(OptimizerConfig(), _model(), MAX_LR, layer_groups=layer_groups, layer_decay=DECAY)
    peaks = [g["lr"] for g in opt.param_groups]
    sched = build_scheduler(opt, name, total, **params)
    history = []
    for _ in range(total):
        history.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return peaks, history


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_scales_every_group_by_the_same_factor(name):
    peaks, history = _peaks_and_history(name, 40)
    assert len(set(peaks)) == LAYERS  # layer decay gave distinct peaks
    head = peaks.index(MAX_LR)
    factors = set()
    for step, lrs in enumerate(history):
        factor = lrs[head] / MAX_LR
        factors.add(round(factor, 9))
        for lr, peak in zip(lrs, peaks, strict=True):
            assert lr == pytest.approx(factor * peak, rel=1e-9, abs=1e-15), (name, step)
    if name != "constant":
        assert len(factors) > 1  # the schedule did change the LR


def test_after_linear_warmup_each_group_is_at_its_own_peak():
    peaks, history = _peaks_and_history("linear", 20, warmup_frac=0.2)  # 4 warmup steps
    assert history[0] == [0.0] * len(peaks)
    assert history[2] == pytest.approx([p / 2 for p in peaks], rel=1e-12)
    assert history[4] == pytest.approx(peaks, rel=1e-12)
    assert sorted({round(lr / MAX_LR, 12) for lr in history[4]}) == [DECAY**3, DECAY**2, DECAY, 1.0]


# --------------------------------------------------------------------------------------------
# Schedule-free AdamW: its train and eval modes around evaluation and checkpoints
# --------------------------------------------------------------------------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))


def _batches(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    from lrsearch.optim.optimizers import train_mode

    train_mode(opt)
    model.train()
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_schedulefree_is_built_ready_to_step_and_its_eval_mode_holds_the_average():
    import schedulefree

    from lrsearch.optim.optimizers import eval_mode, is_schedule_free, train_mode

    model = _bn_net()
    opt = build_optimizer(OptimizerConfig(name="adamw_schedulefree"), model, 1e-2)
    assert isinstance(opt, schedulefree.AdamWScheduleFree) and opt.param_groups[0]["train_mode"]
    assert is_schedule_free(opt) and not is_schedule_free(torch.optim.AdamW(model.parameters()))
    _train(model, opt, _batches())
    y = [p.detach().clone() for p in model.parameters()]
    eval_mode(opt)
    x = [p.detach().clone() for p in model.parameters()]
    assert not opt.param_groups[0]["train_mode"]
    assert max(float((a - b).abs().max()) for a, b in zip(x, y, strict=True)) > 1e-4  # the average, not y
    train_mode(opt)
    back = list(model.parameters())
    assert max(float((a - b).abs().max()) for a, b in zip(back, y, strict=True)) < 1e-6
    eval_mode(torch.optim.SGD(model.parameters(), lr=0.1))  # other optimizers: nothing happens


def test_schedulefree_recomputes_batchnorm_statistics_at_the_average():
    from lrsearch.optim.optimizers import eval_mode

    model = _bn_net()
    opt = build_optimizer(OptimizerConfig(name="adamw_schedulefree"), model, 5e-2)
    _train(model, opt, _batches(12))
    stale = model[1].running_mean.clone()
    batches = _batches(4, seed=7)
    eval_mode(opt, model, batches)
    bn = model[1]
    assert int(bn.num_batches_tracked) == 4 and bn.momentum == 0.1  # momentum put back
    with torch.no_grad():  # the mean of the 4 batches' statistics at the evaluation weights
        feats = [model[0](x) for x, _ in batches]
    expected = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    assert not torch.allclose(stale, expected, atol=1e-3)


def test_schedulefree_checkpoint_in_eval_mode_resumes_exactly():
    from lrsearch.optim.optimizers import eval_mode

    cfg = OptimizerConfig(name="adamw_schedulefree")
    first, second = _batches(5, seed=3), _batches(5, seed=4)
    # uninterrupted: epoch 1, evaluation (eval mode), epoch 2
    model = _bn_net()
    opt = build_optimizer(cfg, model, 1e-2)
    _train(model, opt, first)
    eval_mode(opt, model, first)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "optimizer": __import__("copy").deepcopy(opt.state_dict())}
    _train(model, opt, second)
    eval_mode(opt, model, second)
    # killed after the checkpoint: a fresh model and optimizer, loaded, go on with epoch 2
    resumed = _bn_net()
    opt2 = build_optimizer(cfg, resumed, 1e-2)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    assert not opt2.param_groups[0]["train_mode"]  # saved at the evaluation weights
    _train(resumed, opt2, second)
    eval_mode(opt2, resumed, second)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_the_schedule_free_arm_trains_schedulefree_adamw_with_the_jobs_settings():
    import schedulefree

    import lrsearch
    from lrsearch.engine.trial import build_run
    from lrsearch.errors import ConfigError
    from lrsearch.optim.optimizers import for_schedule
    from lrsearch.output.results import best_config
    from lrsearch.tasks import build_task

    cfg = OptimizerConfig(name="adamw", weight_decay=0.05, betas=(0.8, 0.99))
    arm = for_schedule(cfg, "schedule_free")
    assert arm.name.value == "adamw_schedulefree" and (arm.weight_decay, arm.betas) == (0.05, (0.8, 0.99))
    assert for_schedule(cfg, "linear") is cfg
    with pytest.raises(ConfigError, match="needs an Adam-family optimizer"):
        for_schedule(OptimizerConfig(name="sgd"), "schedule_free")
    job = lrsearch.load_job({"name": "sf", "task": {"kind": "synthetic", "num_train": 64, "num_val": 32}})
    task = build_task(job)
    config = {"max_lr": 1e-3, "schedule": "schedule_free", "schedule_free": {"warmup_frac": 0.1}}
    _, opt, sched, params = build_run(job.optimizer, task, config, torch.device("cpu"), 20)
    assert isinstance(opt, schedulefree.AdamWScheduleFree) and params == {"warmup_frac": 0.1}
    _, plain, _, _ = build_run(job.optimizer, task, {**config, "schedule": "constant", "constant": {}},
                               torch.device("cpu"), 20)
    assert isinstance(plain, torch.optim.AdamW)
    # the best config says what trained it: the export builds the same optimizer
    from lrsearch.output.results import TrialRecord, TrialState

    record = TrialRecord(trial_id="t1", number=1, schedule="schedule_free", max_lr=1e-3, config=config,
                         schedule_params={"warmup_frac": 0.1}, state=TrialState.COMPLETED, stopped_at_epoch=1,
                         metric_per_epoch=[0.9], train_loss_per_epoch=[0.1])
    best = best_config([record], mode="max", metric="accuracy", optimizer=cfg.model_dump(mode="json"),
                       epochs=1, steps_per_epoch=20, total_steps=20)
    assert best.optimizer["name"] == "adamw_schedulefree" and best.optimizer["weight_decay"] == 0.05


def test_recompute_bn_refreshes_statistics_for_any_optimizer_only_when_asked():
    from lrsearch.optim.optimizers import eval_mode

    model = _bn_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, _batches(3))
    before = model[1].running_mean.clone()
    eval_mode(opt, model, _batches(4, seed=9))  # plain AdamW, not asked: untouched
    assert torch.equal(model[1].running_mean, before)
    eval_mode(opt, model, _batches(4, seed=9), recompute_bn=True)
    assert int(model[1].num_batches_tracked) == 4 and not torch.allclose(model[1].running_mean, before)
