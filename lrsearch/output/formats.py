"""Export the best config in forms a training script uses directly, for the user's run length.

A search trains every trial for a short, fixed horizon (say 24 optimizer steps); the user then
trains for as long as they like. So nothing exported is tied to the search's horizon: schedule
parameters stay fractions of the run (``warmup_frac``, ``T_0_frac``, ...) and become step counts
only once the user's total number of optimizer steps is known. The horizon the search used is
kept, labelled, under ``search_horizon``.

Formats:
    - ``yaml`` / ``json``: the portable config (schedule, ``max_lr``, horizon-free ``params``,
      optimizer, layer decay, the metric reached, the trial, the search's horizon).
    - ``hf``: ``transformers.TrainingArguments`` keyword arguments. Warmup is a fraction
      (transformers 5 reads ``warmup_steps < 1`` as a fraction of the run's steps); no
      ``num_train_epochs``. Where transformers lacks the schedule, the note says how to hand
      lrsearch's own scheduler to the ``Trainer``.
    - ``torch``: a snippet defining ``build_optimizer(model)`` and
      ``build_lr_scheduler(optimizer, total_steps)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from lrsearch.errors import ConfigError
from lrsearch.job.config import OptimizerConfig, TrainConfig
from lrsearch.job.space import FRACTION_PARAMS, schedule_params
from lrsearch.optim.schedules import SCHEDULES

__all__ = ["FORMATS", "hf_training_arguments", "portable_config", "render", "torch_snippet"]

FORMATS = ("yaml", "json", "hf", "torch")

_OPTIMIZER_CLASSES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "adamw_schedulefree": "AdamWScheduleFree"}

#: schedule -> (transformers' lr_scheduler_type without / with a floor, whether it has warmup);
#: the only lrsearch schedules transformers computes identically
_HF_SCHEDULES = {
    "linear": ("linear", None, True),
    "cosine": ("cosine", "cosine_with_min_lr", True),
    "cosine_annealing": ("cosine", "cosine_with_min_lr", False),  # = cosine without warmup
    "constant": ("constant", "constant_with_warmup", True),  # second: when warming up
    "schedule_free": ("constant", "constant_with_warmup", True),  # with optim schedule_free_adamw
}


def _horizon_bound(name: str) -> set[str]:
    """Parameters that are step counts (or per-step factors) of one run length: never exported."""
    bound = set(FRACTION_PARAMS.get(name, {}).values())
    if name == "exponential":
        bound.add("gamma")  # per-step factor; min_lr_ratio is the horizon-free form
    return bound


def _load(best: Any) -> dict[str, Any]:
    """The best config as a validated dict of the horizon-free schema."""
    if hasattr(best, "to_dict"):
        best = best.to_dict()
    if not isinstance(best, Mapping):
        raise ConfigError(f"best config: got {type(best).__name__}; expected a mapping or an object with to_dict()")
    best = dict(best)
    if "params" not in best and "schedule_params" in best:
        best = _from_step_schema(best)
    missing = [k for k in ("schedule", "max_lr", "optimizer", "metric", "value") if k not in best]
    if missing:
        raise ConfigError(f"best config: missing {', '.join(missing)}")
    name = best["schedule"]
    if name not in SCHEDULES:
        raise ConfigError(f"best config: schedule: got {name!r}; allowed: {', '.join(SCHEDULES)}")
    params = dict(best.get("params") or {})
    bound = sorted(_horizon_bound(name) & set(params))
    if bound:
        fracs = {v: k for k, v in FRACTION_PARAMS.get(name, {}).items()}
        fix = fracs.get(bound[0], "min_lr_ratio")
        raise ConfigError(f"best config: params.{bound[0]}: a value tied to one run length; "
                          f"the exported params are fractions of the run (use {fix})")
    horizon = best.get("search_horizon") or {}
    try:
        # validates names and values (and fraction -> step conversion) at some run length
        schedule_params({"schedule": name, name: params}, int(horizon.get("total_steps") or 1000))
    except ValueError as exc:
        raise ConfigError(f"best config: params: {exc}") from None
    try:
        optimizer = OptimizerConfig.model_validate(best["optimizer"]).model_dump(mode="json")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"best config: optimizer.{where}: {first['msg']} (got {first['input']!r})") from None
    return {
        "schedule": name,
        "max_lr": float(best["max_lr"]),
        "params": params,
        "optimizer": optimizer,
        "train": _train_recipe(best.get("train")),
        "layer_decay": best.get("layer_decay"),
        "metric": best["metric"],
        "value": best["value"],
        "trial_id": best.get("trial_id"),
        "search_horizon": dict(horizon) if horizon else None,
    }


#: what a best config without a ``train`` recipe was searched with (lrsearch before the recipe)
_NO_RECIPE = {"max_grad_norm": None, "precision": "fp32", "gradient_accumulation_steps": 1}


def _train_recipe(train: Any) -> dict[str, Any]:
    """The training recipe of a best config, validated (a config from before recipes: none)."""
    if not train:
        return dict(_NO_RECIPE)

    try:
        recipe = TrainConfig.model_validate(train).model_dump(mode="json")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"best config: train.{where}: {first['msg']} (got {first['input']!r})") from None
    if recipe["recompute_bn"]:  # as the best config records it: only when off (the default is on)
        del recipe["recompute_bn"]
    return recipe


def _from_step_schema(best: dict[str, Any]) -> dict[str, Any]:
    """Read a best_config.yaml written before the horizon-free schema (``schedule_params`` in steps,
    ``total_steps``, ``epochs``). The trial's own config, when there, holds the fractions it sampled;
    otherwise step counts become fractions of the search's ``total_steps``."""
    name, config = best.get("schedule"), best.get("search_config") or {}
    stepped, total, epochs = dict(best["schedule_params"] or {}), best.get("total_steps"), best.get("epochs")
    params = dict(config.get(name) or {}) if name in SCHEDULES else {}
    if not params and name in SCHEDULES:
        bound = _horizon_bound(name)
        params = {k: v for k, v in stepped.items() if k not in bound}
        for frac, step in FRACTION_PARAMS.get(name, {}).items():
            if step in stepped and total:
                params[frac] = stepped[step] / total
    horizon = {"epochs": epochs, "steps_per_epoch": total // epochs if total and epochs else None,
               "total_steps": total, "schedule_params": stepped}
    rest = {k: v for k, v in best.items() if k not in ("schedule_params", "total_steps", "epochs")}
    return rest | {"params": params, "search_horizon": horizon}


def _integral(name: str, key: str, value: Any) -> Any:
    # YAML may hold T_mult: 2.0; print integer parameters as integers
    param = next((p for p in SCHEDULES[name].params if p.name == key), None)
    if param is not None and param.integer and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _scheduler_args(b: dict[str, Any]) -> list[str]:
    """``build_scheduler`` keyword arguments as Python source, in terms of a ``total_steps`` variable."""
    name, fractions = b["schedule"], FRACTION_PARAMS.get(b["schedule"], {})
    args = []
    for key, value in b["params"].items():
        if key in fractions:
            # the same conversion as lrsearch.job.space.schedule_params
            args.append(f"{fractions[key]}=max(1, round({value!r} * total_steps))")
        else:
            args.append(f"{key}={_integral(name, key, value)!r}")
    return args


def _scheduler_call(b: dict[str, Any], module: str = "") -> str:
    args = ", ".join([f"{b['schedule']!r}", "total_steps", *_scheduler_args(b)])
    return f"{module}build_scheduler(optimizer, {args})"


def _horizon_text(b: dict[str, Any]) -> str | None:
    """``searched over 24 optimizer steps (2 epochs of 12)``, or None without a horizon."""
    h = b["search_horizon"]
    if not h or not h.get("total_steps"):
        return None
    epochs = ""
    if h.get("epochs"):
        of = f" of {h['steps_per_epoch']}" if h.get("steps_per_epoch") else ""
        epochs = f" ({h['epochs']} epoch{'s' if h['epochs'] != 1 else ''}{of})"
    return f"searched over {h['total_steps']} optimizer steps{epochs}"


def portable_config(best: Any) -> dict[str, Any]:
    """The best config in the horizon-free schema, in a stable order (what ``yaml``/``json`` export).

    Args:
        best: a best config (``best_config.yaml`` loaded as a dict, or an object with ``to_dict()``).

    Returns:
        ``schedule``, ``max_lr``, ``params`` (fractions of the run), ``optimizer`` (every field),
        ``layer_decay``, ``metric``, ``value``, ``trial_id`` and ``search_horizon``.

    Raises:
        ConfigError: a missing field, unknown schedule or parameter, a value out of range, or a
            step count in ``params``.
    """
    return _load(best)


def hf_training_arguments(best: Any) -> tuple[dict[str, Any], str]:
    """``transformers.TrainingArguments`` keyword arguments for the best config, for any run length.

    Warmup is ``warmup_steps`` as a fraction (< 1) of the run's steps, the form transformers 5
    reads (it has no ``warmup_ratio``); ``num_train_epochs`` is left to the user. The training
    recipe the search used becomes ``max_grad_norm`` (0 for none: the Trainer's own default clips
    at 1.0), ``bf16`` / ``fp16`` and ``gradient_accumulation_steps``. Where transformers
    has no schedule equal to lrsearch's (``stlr``, ``cosine_restarts``, ``exponential``, ``step``,
    ``one_cycle``) the kwargs hold everything else and the note gives the ``build_scheduler`` call
    to pass as ``Trainer(optimizers=(optimizer, scheduler))``.

    Args:
        best: a best config (dict or an object with ``to_dict()``).

    Returns:
        ``(kwargs, note)``: the keyword arguments and a note for the user (the search's horizon,
        and what ``TrainingArguments`` cannot express).

    Example:
        >>> kwargs, _ = hf_training_arguments({"schedule": "linear", "max_lr": 3e-4,
        ...     "params": {"warmup_frac": 0.2}, "optimizer": {"name": "adamw"},
        ...     "metric": "val_accuracy", "value": 0.9})
        >>> kwargs["lr_scheduler_type"], kwargs["warmup_steps"]
        ('linear', 0.2)
    """
    b = _load(best)
    opt, name = b["optimizer"], b["schedule"]
    kwargs: dict[str, Any] = {"learning_rate": b["max_lr"], "weight_decay": opt["weight_decay"]}
    notes = []
    if opt["name"] in ("adamw", "adam"):
        kwargs.update(optim="adamw_torch", adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1],
                      adam_epsilon=opt["eps"])
        if opt["name"] == "adam" and opt["weight_decay"]:
            notes.append("the search used Adam with L2 weight decay; the Trainer's is AdamW (decoupled): "
                         "pass torch.optim.Adam yourself through Trainer(optimizers=...) to match it.")
    elif opt["name"] == "adamw_schedulefree":
        # the Trainer switches the optimizer's train/eval modes around evaluation itself
        kwargs.update(optim="schedule_free_adamw", adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1],
                      adam_epsilon=opt["eps"])
    else:
        kwargs.update(optim="sgd", optim_args=f"momentum={opt['momentum']}")
    recipe = b["train"]
    # the Trainer clips when max_grad_norm > 0: 0 turns its default clipping at 1.0 off, as searched
    kwargs.update(max_grad_norm=recipe["max_grad_norm"] or 0.0,
                  bf16=recipe["precision"] == "bf16", fp16=recipe["precision"] == "fp16",
                  gradient_accumulation_steps=recipe["gradient_accumulation_steps"])
    resolved = schedule_params({"schedule": name, name: b["params"]}, 1000)
    horizon = _horizon_text(b)
    if name in _HF_SCHEDULES:
        plain, other, warms = _HF_SCHEDULES[name]
        warmup = float(resolved["warmup_frac"]) if warms else 0.0
        if name in ("constant", "schedule_free"):
            kwargs["lr_scheduler_type"] = other if warmup else plain
        elif resolved.get("min_lr_ratio"):
            kwargs.update(lr_scheduler_type=other, lr_scheduler_kwargs={"min_lr_rate": resolved["min_lr_ratio"]})
        else:
            kwargs["lr_scheduler_type"] = plain
        kwargs["warmup_steps"] = warmup
        if horizon and warmup:
            notes.insert(0, f"{horizon}; warmup is given as a fraction (warmup_steps={warmup!r}) so it scales "
                            "to your run.")
        elif horizon:
            notes.insert(0, f"{horizon}; nothing here depends on that length: the schedule spans your run.")
        if warmup:
            notes.append("transformers rounds fractional warmup up, lrsearch down: at most one step apart.")
    else:
        if horizon:
            notes.insert(0, f"{horizon}; the schedule is given in fractions of the run so it scales to yours.")
        notes.append(
            f"transformers has no {name!r} schedule equal to lrsearch's: build lrsearch's for your run's total "
            f"optimizer steps and hand it to the Trainer: "
            f"`scheduler = {_scheduler_call(b, 'lrsearch.optim.schedules.')}`, then "
            "`Trainer(..., args=TrainingArguments(**kwargs), optimizers=(optimizer, scheduler))` "
            "(`lrsearch export --format torch` writes build_optimizer and build_lr_scheduler for this).")
    if b["layer_decay"] is not None and b["layer_decay"] != 1:
        notes.append(f"layer_decay={b['layer_decay']!r} was searched and TrainingArguments has no layer-wise LR: "
                     "build the optimizer with lrsearch.optim.optimizers.param_groups(model, lr, weight_decay, "
                     f"layer_groups=..., layer_decay={b['layer_decay']!r}) and pass optimizers=(optimizer, scheduler).")
    return kwargs, " ".join(notes)


def torch_snippet(best: Any) -> str:
    """A Python snippet building the best optimizer and LR schedule for a run of any length.

    It defines ``build_optimizer(model)`` and ``build_lr_scheduler(optimizer, total_steps)``;
    fractions of the run become step counts from ``total_steps`` when the scheduler is built.

    Args:
        best: a best config (dict or an object with ``to_dict()``).

    Returns:
        The snippet's source (valid Python; it imports torch and lrsearch).
    """
    b = _load(best)
    opt, layer_decay = b["optimizer"], b["layer_decay"]
    cls = _OPTIMIZER_CLASSES[opt["name"]]
    if opt["name"] == "sgd":
        make = f"torch.optim.SGD(groups, lr=MAX_LR, momentum={opt['momentum']!r})"
    elif opt["name"] == "adamw_schedulefree":
        # built in eval mode; call optimizer.eval() before evaluating or saving, .train() after
        make = (f"schedulefree.AdamWScheduleFree(groups, lr=MAX_LR, betas={tuple(opt['betas'])!r}, "
                f"eps={opt['eps']!r})")
    else:
        make = f"torch.optim.{cls}(groups, lr=MAX_LR, betas={tuple(opt['betas'])!r}, eps={opt['eps']!r})"
    if layer_decay is not None and layer_decay != 1:
        sig = "model: torch.nn.Module, layer_groups=None"
        doc = (f'    """{cls} at the searched peak LR, layer-wise decay {layer_decay!r}: pass layer_groups,\n'
               "    a function of the model returning its parameter lists bottom (embeddings) to top (head);\n"
               '    without it every layer gets MAX_LR. No weight decay on biases and norm weights."""\n')
        groups = (f"param_groups(model, MAX_LR, {opt['weight_decay']!r}, layer_groups=layer_groups, "
                  f"layer_decay={layer_decay!r})")
    else:
        sig = "model: torch.nn.Module"
        doc = f'    """{cls} at the searched peak LR; no weight decay on biases and norm weights."""\n'
        groups = f"param_groups(model, MAX_LR, {opt['weight_decay']!r})"
    value = b["value"]
    score = f"{value:.4f}" if isinstance(value, int | float) else repr(value)
    horizon = _horizon_text(b)
    horizon_lines = ""
    if horizon:
        horizon_lines = (f"# {horizon[0].upper()}{horizon[1:]}: the search's horizon, not your run's.\n"
                         "# The schedule is in fractions of the run, built for the total_steps you give it.\n")
        if b["search_horizon"].get("schedule_params"):
            horizon_lines += f"# At the search's horizon it was: {b['search_horizon']['schedule_params']!r}\n"
    args = "".join(f"        {a},\n" for a in _scheduler_args(b))
    recipe = b["train"]
    norm, precision = recipe["max_grad_norm"], recipe["precision"]
    clip = ("    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)\n" if norm
            else "    # the search did not clip gradients (train.max_grad_norm: null)\n")
    if precision == "fp16":
        clip = "    scaler.unscale_(optimizer)\n" + clip + "    scaler.step(optimizer)\n    scaler.update()\n"
        sig_step, amp_doc = "model, optimizer, scheduler, scaler", (
            "    scaler = torch.amp.GradScaler('cuda'); forward under\n"
            "    torch.autocast('cuda', dtype=torch.float16) and call scaler.scale(loss).backward().\n")
    else:
        clip += "    optimizer.step()\n"
        sig_step = "model, optimizer, scheduler"
        amp_doc = ("    Forward under torch.autocast(device_type, dtype=torch.bfloat16), as the search did.\n"
                   if precision == "bf16" else "")
    extra_import, make_lines = "", f"    return {make}"
    if opt["name"] == "adamw_schedulefree":
        extra_import = "import schedulefree\n"
        make_lines = (f"    optimizer = {make}\n"
                      "    optimizer.train()  # schedule-free: .eval() before evaluating or saving, .train() after\n"
                      "    return optimizer")
    return f'''# Best LR strategy found by lrsearch: {b['metric']} = {score} (trial {b['trial_id']})
{horizon_lines}import torch
{extra_import}
from lrsearch.optim.optimizers import param_groups
from lrsearch.optim.schedules import build_scheduler

MAX_LR = {b['max_lr']!r}
# the training recipe the search used (its train section)
MAX_GRAD_NORM = {norm!r}
PRECISION = {precision!r}
GRAD_ACCUMULATION_STEPS = {recipe['gradient_accumulation_steps']!r}


def build_optimizer({sig}) -> torch.optim.Optimizer:
{doc}    groups = {groups}
{make_lines}


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int):
    """The {b['schedule']!r} schedule over total_steps optimizer steps (your run's, e.g.
    num_epochs * len(train_loader) // grad_accumulation); step it after every optimizer.step()."""
    return build_scheduler(
        optimizer,
        {b['schedule']!r},
        total_steps,
{args}    )


def optimizer_step({sig_step}) -> None:
    """After loss.backward() on GRAD_ACCUMULATION_STEPS batches (each loss divided by it): clip
    the gradients as the search did, step, advance the schedule, zero the gradients.
{amp_doc}    """
{clip}    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# optimizer = build_optimizer(model)
# scheduler = build_lr_scheduler(optimizer, total_steps)
# per optimizer step: loss.backward() on each batch, then optimizer_step({sig_step})
'''


def render(best: Any, fmt: str) -> tuple[str, str | None]:
    """The best config exported in ``fmt``, and an optional note for the user.

    Args:
        best: a best config (``best_config.yaml`` loaded as a dict, or an object with ``to_dict()``).
        fmt: one of :data:`FORMATS`.

    Returns:
        ``(text, note)``: the text to write, and a note (``hf`` only) or ``None``.

    Raises:
        ConfigError: ``fmt`` is not one of :data:`FORMATS`, or the best config is invalid.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "yaml":
        return yaml.safe_dump(portable_config(best), sort_keys=False), None
    if fmt == "json":
        return json.dumps(portable_config(best), indent=2) + "\n", None
    if fmt == "hf":
        kwargs, note = hf_training_arguments(best)
        return json.dumps(kwargs, indent=2) + "\n", note or None
    return torch_snippet(best), None
