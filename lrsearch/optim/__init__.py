"""The schedule, optimizer and recipe math, below the job schema and the tasks.

``schedules`` (with ``schedule_math`` and ``schedule_factories``) the LR schedules, ``optimizers``
the parameter groups and torch optimizers, ``recipe`` one optimizer step the job's way (clipping,
precision, accumulation), ``divergence`` the NaN and exploding-loss stop, ``batches`` how a batch
meets a model."""
