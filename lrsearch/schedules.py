"""The schedule registry and its builder at the path DESIGN's contract names
(``lrsearch.schedules.SCHEDULES``, ``lrsearch.schedules.build_scheduler``); the math lives in
:mod:`lrsearch.optim.schedules`, beside the optimizer and the recipe."""

from lrsearch.optim.schedules import (
    SCHEDULES,
    Param,
    Schedule,
    build_scheduler,
    lr_curve,
    resolve_params,
)

__all__ = ["SCHEDULES", "Param", "Schedule", "build_scheduler", "lr_curve", "resolve_params"]
