"""Export the best config in forms a training script uses directly.

Formats: ``yaml`` / ``json`` (everything), ``hf`` (``transformers.TrainingArguments`` keyword
arguments where transformers has the schedule), ``torch`` (a snippet building the optimizer and
``lrsearch.schedules.build_scheduler``).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from lrsearch.errors import ConfigError

FORMATS = ("yaml", "json", "hf", "torch")


def portable_config(best: dict[str, Any]) -> dict[str, Any]:
    """The parts of a best config a training script needs, in a stable order."""
    return {
        "schedule": best["schedule"],
        "max_lr": best["max_lr"],
        "schedule_params": best["schedule_params"],
        "total_steps": best["total_steps"],
        "epochs": best["epochs"],
        "optimizer": best["optimizer"],
        "layer_decay": best.get("layer_decay"),
        "metric": best["metric"],
        "value": best["value"],
        "trial_id": best.get("trial_id"),
    }


def hf_training_arguments(best: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``TrainingArguments`` kwargs and, when transformers lacks the schedule, a note saying how to
    pass lrsearch's scheduler instead (the kwargs then hold everything else)."""
    opt = best["optimizer"]
    kwargs: dict[str, Any] = {
        "learning_rate": best["max_lr"],
        "num_train_epochs": best["epochs"],
        "weight_decay": opt.get("weight_decay", 0.0),
    }
    if opt["name"] in ("adamw", "adam"):
        # transformers' Trainer has AdamW, not Adam: identical when weight_decay is 0
        kwargs.update(optim="adamw_torch", adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1],
                      adam_epsilon=opt["eps"])
    else:
        kwargs.update(optim="sgd")
    name, p, total = best["schedule"], best["schedule_params"], best["total_steps"]
    warmup = int(p.get("warmup_frac", 0.0) * total)
    note = None
    if name == "linear":
        kwargs.update(lr_scheduler_type="linear", warmup_steps=warmup)
    elif name == "cosine" and not p.get("min_lr_ratio"):
        kwargs.update(lr_scheduler_type="cosine", warmup_steps=warmup)
    elif name == "cosine":
        kwargs.update(lr_scheduler_type="cosine_with_min_lr", warmup_steps=warmup,
                      lr_scheduler_kwargs={"min_lr_rate": p["min_lr_ratio"]})
    elif name == "constant":
        kwargs.update(lr_scheduler_type="constant_with_warmup" if warmup else "constant", warmup_steps=warmup)
    else:
        args = ", ".join(f"{k}={v!r}" for k, v in p.items())
        note = (f"transformers has no {name!r} schedule equal to lrsearch's; pass lrsearch's own scheduler: "
                f"optimizer = torch.optim.AdamW(model.parameters(), lr={best['max_lr']!r}); "
                f"scheduler = lrsearch.schedules.build_scheduler(optimizer, {name!r}, total_steps={total}, {args}); "
                "Trainer(..., args=TrainingArguments(**kwargs), optimizers=(optimizer, scheduler))")
    if opt["name"] == "sgd" and note is None:
        note = f"transformers' 'sgd' optim uses no momentum by default; pass optim_args='momentum={opt['momentum']}'"
    return kwargs, note


def torch_snippet(best: dict[str, Any]) -> str:
    opt = best["optimizer"]
    params = ", ".join(f"{k}={v!r}" for k, v in best["schedule_params"].items())
    if opt["name"] == "sgd":
        make = f"torch.optim.SGD(model.parameters(), lr={best['max_lr']!r}, momentum={opt['momentum']!r}, weight_decay={opt['weight_decay']!r})"
    else:
        cls = "AdamW" if opt["name"] == "adamw" else "Adam"
        make = (f"torch.optim.{cls}(model.parameters(), lr={best['max_lr']!r}, betas={tuple(opt['betas'])!r}, "
                f"eps={opt['eps']!r}, weight_decay={opt['weight_decay']!r})")
    return f'''# Best LR strategy found by lrsearch: {best['metric']} = {best['value']:.4f} (trial {best.get('trial_id')})
import torch

from lrsearch.schedules import build_scheduler

optimizer = {make}
# {best['total_steps']} optimizer steps = {best['epochs']} epochs; step the scheduler after every optimizer.step()
scheduler = build_scheduler(optimizer, {best['schedule']!r}, total_steps={best['total_steps']}{', ' + params if params else ''})
'''


def render(best: dict[str, Any], fmt: str) -> tuple[str, str | None]:
    """The exported text in ``fmt`` and an optional note for the user."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: got {fmt!r}; allowed: {', '.join(FORMATS)}")
    config = portable_config(best)
    if fmt == "yaml":
        return yaml.safe_dump(config, sort_keys=False), None
    if fmt == "json":
        return json.dumps(config, indent=2) + "\n", None
    if fmt == "hf":
        kwargs, note = hf_training_arguments(best)
        return json.dumps(kwargs, indent=2) + "\n", note
    return torch_snippet(best), None
